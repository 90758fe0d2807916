"""Every setting is documented in the class and listed in the README."""

from __future__ import annotations

from pathlib import Path

from shared.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_setting_has_a_description_and_a_readme_row() -> None:
    readme = README.read_text()
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no description"
        assert f"CONVEYOR_{name.upper()}" in readme, f"README does not list CONVEYOR_{name.upper()}"


def test_settings_come_from_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CONVEYOR_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("CONVEYOR_HOME", str(tmp_path))
    monkeypatch.delenv("CONVEYOR_REDIS_URL", raising=False)
    monkeypatch.delenv("CONVEYOR_MODEL_DIR", raising=False)
    settings = Settings()
    assert settings.max_batch_size == 7 and settings.concurrency() == 28
    assert settings.models_path == tmp_path / "models"
    (tmp_path / "redis.url").write_text("redis://:pw@127.0.0.1:1234/0\n")
    assert settings.broker_url() == "redis://:pw@127.0.0.1:1234/0"
