"""Jobs read input files only under CONVEYOR_INPUT_ROOTS, and no error repeats what a file
holds: a job naming a secret learns neither its contents nor, outside the roots, whether it exists."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.errors import InvalidJob
from shared.input_paths import resolve_input
from shared.jobs import FineTuneJob, TrainJob
from shared.model_store import ModelStore
from shared.settings import Settings

SECRET = "root:$6$Zq9SECRETHASHxk2$aVeryPrivateValue:19000:0:99999:7:::"


@pytest.fixture()
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    inside = tmp_path / "inputs"
    inside.mkdir()
    monkeypatch.setenv("CONVEYOR_INPUT_ROOTS", str(inside))
    return inside


def test_a_file_under_a_root_resolves(roots: Path) -> None:
    (roots / "sub").mkdir()
    data = roots / "sub" / "a.csv"
    data.write_text("user,item\n")
    assert resolve_input(str(roots / "sub" / ".." / "sub" / "a.csv"), field="data_path") == data.resolve()


def test_escapes_are_refused_alike_whether_or_not_the_file_exists(roots: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    (roots / "link").symlink_to(secret)
    (roots / "dirlink").symlink_to(tmp_path)
    messages = []
    for path in (
        secret,
        tmp_path / "no-such-file.txt",
        roots / ".." / "secret.txt",
        roots / "link",
        roots / "dirlink" / "secret.txt",
        Path("/etc/shadow"),
    ):
        with pytest.raises(InvalidJob) as err:
            resolve_input(str(path), field="data_path")
        messages.append(str(err.value).replace(str(path), "PATH"))
    assert len(set(messages)) == 1, messages  # nothing tells an existing file from a missing one
    assert messages[0].startswith("data_path: PATH is outside the directories jobs may read")


def test_relative_and_nul_paths_are_refused(roots: Path) -> None:
    with pytest.raises(InvalidJob, match="data_path: must be an absolute path"):
        resolve_input("inputs/a.csv", field="data_path")
    with pytest.raises(InvalidJob, match="not a valid path"):
        resolve_input(str(roots) + "/a\x00b", field="data_path")


def test_roots_setting_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CONVEYOR_INPUT_ROOTS", raising=False)
    monkeypatch.chdir(tmp_path)
    # Default: the home's inputs/ and the current directory (of `conveyor up`, handed to its workers).
    assert Settings().allowed_input_roots() == [(tmp_path / "home" / "inputs").resolve(), tmp_path.resolve()]
    monkeypatch.setenv("CONVEYOR_INPUT_ROOTS", f"{tmp_path}/a:{tmp_path}/b")
    assert Settings().allowed_input_roots() == [(tmp_path / "a").resolve(), (tmp_path / "b").resolve()]
    assert Settings().input_roots_env() == f"{(tmp_path / 'a').resolve()}:{(tmp_path / 'b').resolve()}"
    monkeypatch.setenv("CONVEYOR_INPUT_ROOTS", f'["{tmp_path}/c"]')
    assert Settings().allowed_input_roots() == [(tmp_path / "c").resolve()]


# -- no file contents in errors ----------------------------------------------------------


@pytest.mark.parametrize("name", ["shadow", "shadow.csv", "shadow.tsv", "shadow.jsonl"])
def test_train_and_fine_tune_errors_do_not_repeat_the_file(roots: Path, name: str) -> None:
    from workers.training.finetune import _datasets
    from workers.training.recommender import train_recommender

    secret_file = roots / name
    secret_file.write_text(SECRET + "\nbin:*:19000:0:99999:7:::\n" + "x,y\n" * 20)
    messages = []
    with pytest.raises(InvalidJob) as err:
        train_job = TrainJob(interactions_path=str(secret_file), output_name="x")
        train_recommender(train_job, ModelStore(roots / "models"), roots / "ckpt", print, lambda: False)
    messages.append(str(err.value))
    for job in (
        FineTuneJob(data_path=str(secret_file), output_name="x"),
        FineTuneJob(data_path=str(secret_file), output_name="x", text_column="root", label_column="bin"),
    ):
        with pytest.raises(InvalidJob) as err:
            _datasets(job)
        messages.append(str(err.value))
    for message in messages:
        assert str(secret_file) in message  # the job's own path is named ...
        for fragment in ("SECRET", "aVeryPrivate", "19000", "99999", "bin:"):
            assert fragment not in message, message  # ... never what the file holds


def test_values_in_a_table_are_not_repeated(roots: Path) -> None:
    from workers.training.data import read_interactions

    path = roots / "a.csv"
    path.write_text("user,item,rating,timestamp\n" + "u,i,1,1\n" * 3 + f"u,i,{SECRET},1\n")
    with pytest.raises(InvalidJob) as err:
        read_interactions(path)
    assert "line 5: column 'rating' is not a number" in str(err.value) and "SECRET" not in str(err.value)
    path.write_text("user:" + SECRET + ",item\n" + "u,i\n" * 3 + ",i\n")
    with pytest.raises(InvalidJob) as err:
        read_interactions(path)
    assert "line 5: no value in column 'user'" in str(err.value) and "SECRET" not in str(err.value)


def test_an_unknown_model_error_does_not_name_the_store_directory(tmp_path: Path) -> None:
    from shared.errors import ModelNotFound

    store_dir = tmp_path / "private-store-dir"
    with pytest.raises(ModelNotFound) as err:
        ModelStore(store_dir).resolve("no-such-model")
    assert "no model 'no-such-model' in the model store" in str(err.value)
    assert str(tmp_path) not in str(err.value)
