"""Settings: defaults, environment variables, and errors that name the variable."""

from __future__ import annotations

import pytest

from driftline.config import ConfigError, Settings, load_settings


def test_defaults_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("DRIFTLINE_"):
            monkeypatch.delenv(name)
    settings = load_settings()
    assert settings.slice_templates == ["station", "station+shift", "shift", "lot"]
    assert settings.tokens() == []


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIFTLINE_SLICE_TEMPLATES", "station, lot")
    monkeypatch.setenv("DRIFTLINE_EMBED_BATCH_SIZE", "64")
    monkeypatch.setenv("DRIFTLINE_API_TOKENS", "ana:operator:0123456789abcdef0123")
    settings = load_settings()
    assert settings.slice_templates == ["station", "lot"]
    assert settings.embed_batch_size == 64
    (token,) = settings.tokens()
    assert (token.name, token.role) == ("ana", "operator")
    assert "0123456789abcdef" not in repr(settings)


@pytest.mark.parametrize(
    ("var", "value", "hint"),
    [
        ("DRIFTLINE_API_PORT", "eighty", "integer"),
        ("DRIFTLINE_EMBED_BATCH_SIZE", "0", "greater than or equal"),
        ("DRIFTLINE_SLICE_TEMPLATES", "station+line", "dimensions"),
        ("DRIFTLINE_KAFKA_BOOTSTRAP", "localhost", "host:port"),
        ("DRIFTLINE_REDIS_URL", "localhost:6379", "redis://"),
        ("DRIFTLINE_LOG_LEVEL", "LOUD", "DEBUG"),
        ("DRIFTLINE_API_TOKENS", "ana:admin:changeme", "placeholder"),
        ("DRIFTLINE_API_TOKENS", "ana:root:0123456789abcdef0123", "role"),
        ("DRIFTLINE_BUDGET_PERIOD_DAYS", "-1", "greater than"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, hint: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert var in str(info.value)
    assert hint in str(info.value)


def test_every_setting_is_documented_in_the_readme() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [f"DRIFTLINE_{name.upper()}" for name in Settings.model_fields
               if f"DRIFTLINE_{name.upper()}" not in readme]
    assert not missing, f"README configuration table lacks {missing}"
