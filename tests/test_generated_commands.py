"""Commands made from a kind's schema (`conveyor submit NAME`, `conveyor score NAME`) and the
generic bulk-scoring adapter, on a kind spec built here (the registry's own kinds are walked
through them by tests/test_registry.py)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import typer
from pydantic import ValidationError
from typer.testing import CliRunner

from producers.cli import generated_submit
from producers.schema_options import option_values, schema_options
from producers.score.cli import generated_score
from producers.score.kinds import ItemScoring
from shared.kinds import KINDS, ScoreColumn
from shared.settings import Settings

SPEC = dataclasses.replace(
    KINDS["classify"],
    name="classify",
    scoring=None,
    score_columns=(ScoreColumn("top", "top", "string"), ScoreColumn("raw", "labels", "json")),
)


def test_schema_options_cover_the_jobs_fields_with_their_help() -> None:
    params, how = schema_options(SPEC)
    names = {p.name for p in params}
    assert {"texts", "labels", "model", "top_k", "label_template", "priority", "deadline"} <= names
    assert not names & {"id", "type", "schema_version", "submitted_at"}
    assert how["texts"] == "list" and how["labels"] == "split" and how["top_k"] == "plain"
    assert option_values({"labels": "a, b,", "top_k": 3, "model": None}, how) == {"labels": ["a", "b"], "top_k": 3}


def test_a_generated_submit_command_sends_only_what_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    import producers.cli as cli

    sent: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(cli, "_submit", lambda kind, fields, wait, timeout: sent.append((kind, fields)))
    app = typer.Typer()
    app.command("classify")(generated_submit(SPEC))
    app.command("other")(lambda: None)
    out = CliRunner().invoke(app, ["classify", "--text", "One.", "--text", "Two.", "--labels", "a,b", "--top-k", "1"])
    assert out.exit_code == 0, out.output
    assert sent == [("classify", {"texts": ["One.", "Two."], "labels": ["a", "b"], "top_k": 1})]
    assert "--label-template" in CliRunner().invoke(app, ["classify", "--help"]).output


def test_the_generic_scoring_adapter_checks_rows_builds_jobs_and_reads_columns() -> None:
    scoring = ItemScoring(SPEC, labels=["sports", "finance"])
    assert scoring.job_type == "classify" and [f.name for f in scoring.result_fields] == ["top", "raw"]
    assert scoring.chunk_size(Settings()) == min(512, 4 * Settings().max_batch_size)
    assert scoring.check("A text.") == ("A text.", None)
    assert scoring.check("   ")[1] is not None and scoring.check(None)[1] is not None
    assert "at most" in (scoring.check("x" * 20_001)[1] or "")
    job = scoring.job("score-run-0000001", ["One.", "Two."])
    assert job.id == "score-run-0000001" and job.texts == ["One.", "Two."] and job.labels == ["sports", "finance"]  # type: ignore[attr-defined]
    result = {"results": [{"top": "sports", "labels": [1, 2]}, {"top": "finance", "labels": []}]}
    assert scoring.columns(result, 2) == {"top": ["sports", "finance"], "raw": ["[1, 2]", "[]"]}
    with pytest.raises(ValueError):
        scoring.columns(result, 3)
    with pytest.raises(ValidationError):  # a bad option fails before anything runs
        ItemScoring(SPEC, labels=["only-one"])


def test_a_generated_score_command_passes_the_options_to_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import producers.score.cli as score_cli

    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(score_cli, "_score", lambda *args: calls.append(args))
    app = typer.Typer()
    app.command("classify")(generated_score(SPEC))
    app.command("other")(lambda: None)
    out = CliRunner().invoke(app, ["classify", "in.csv", "--out", "o.jsonl", "--labels", "a,b", "--quiet"])
    assert out.exit_code == 0, out.output
    ((kind, options, input, out_path, column, common),) = calls
    assert kind == "classify" and options == {"labels": ["a", "b"]} and column == "text"
    assert str(input) == "in.csv" and str(out_path) == "o.jsonl" and common["quiet"] is True
    assert json.dumps(common)  # plain values only
