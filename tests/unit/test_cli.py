"""``driftline`` commands: option checks and start-up errors, without a stack."""

from __future__ import annotations

from typing import Any

import pytest
import uvicorn
from typer.testing import CliRunner

from driftline import runner
from driftline.cli import app
from driftline.config import load_settings


@pytest.fixture
def uvicorn_runs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The servers `driftline serve` would run (none is started)."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    return calls


class NoService:
    """Stands in for the stages: `driftline run` must stop before it starts any."""

    def __init__(self, *args: Any) -> None:
        raise AssertionError("the stages were started")


@pytest.mark.parametrize("command", ["serve", "run"])
@pytest.mark.parametrize("port", ["0", "70000", "-1"])
def test_a_port_out_of_range_is_refused_naming_the_option(
        monkeypatch: pytest.MonkeyPatch, uvicorn_runs: list[dict[str, Any]], command: str,
        port: str) -> None:
    """70000 failed with an OverflowError traceback; 0 silently served on DRIFTLINE_API_PORT."""
    monkeypatch.setattr(runner, "Service", NoService)
    result = CliRunner().invoke(app, [command, "--port", port])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--port'" in result.output
    assert uvicorn_runs == []


def test_serve_uses_the_port_given_else_the_setting(
        monkeypatch: pytest.MonkeyPatch, uvicorn_runs: list[dict[str, Any]]) -> None:
    from driftline.service.app import serve

    monkeypatch.setenv("DRIFTLINE_API_PORT", "8123")
    assert CliRunner().invoke(app, ["serve", "--port", "65535"]).exit_code == 0
    assert CliRunner().invoke(app, ["serve"]).exit_code == 0
    serve(load_settings(api_port=8123), port=0)  # 0 is a port (any free one), not "unset"
    assert [call["port"] for call in uvicorn_runs] == [65535, 8123, 0]
