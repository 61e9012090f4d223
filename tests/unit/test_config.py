"""Settings: defaults, environment variables, and errors that name the variable."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from typer.testing import CliRunner

from driftline.alerts.model import Incident, Severity, Status
from driftline.alerts.routing import Router
from driftline.cli import app
from driftline.config import (
    BOOK_ALERT_LABELS,
    SLICE_DIMENSIONS,
    ConfigError,
    Settings,
    load_settings,
    mask_url,
)


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
        # accepted, then never matched: the header is read as Latin-1, 'ø' arrives as 'Ã¸'
        ("DRIFTLINE_API_TOKENS", "ana:admin:tøken-0123456789abcdef", "outside ASCII"),
        # the caller got the first entry's name and role: ana's viewer, never bo's admin
        ("DRIFTLINE_API_TOKENS", "ana:viewer:0123456789abcdef0123,bo:admin:0123456789abcdef0123",
         "'ana' and 'bo' are the same token"),
        ("DRIFTLINE_BUDGET_PERIOD_DAYS", "-1", "greater than"),
        ("DRIFTLINE_LATE_LABEL_HOURS", "0", "greater than"),
        # accepted once, then every push failed with httpx's UnsupportedProtocol
        ("DRIFTLINE_ALERTMANAGER_URL", "not-a-url", "http:// or https://"),
        ("DRIFTLINE_PUBLIC_URL", "garbage", "http:// or https://"),
        ("DRIFTLINE_ALERT_WEBHOOK_URL", "foo", "http:// or https://"),
        ("DRIFTLINE_ALERT_WEBHOOK_URL", "ftp://hooks.example/x", "http:// or https://"),
        ("DRIFTLINE_ALERTMANAGER_URL", "http://", "with a host"),
        ("DRIFTLINE_ALERTMANAGER_URL", "http://am:port", "with a host"),
        ("DRIFTLINE_PUBLIC_URL", " ", "http:// or https://"),  # empty: the API's own
        ("DRIFTLINE_EVENTS_TOPIC", "", "topic name"),
        ("DRIFTLINE_ALERTS_TOPIC", "driftline alerts", "topic name"),
        ("DRIFTLINE_DLQ_TOPIC", "..", "topic name"),
        ("DRIFTLINE_SLICE_UPDATES_TOPIC", "t" * 250, "topic name"),
        ("DRIFTLINE_DETECT_GROUP", " ", "empty"),
        ("DRIFTLINE_API_HOST", "", "empty"),
        ("DRIFTLINE_IMAGE_ROOTS", "/srv/images,images", "absolute paths"),
        ("DRIFTLINE_ONNX_PROVIDERS", "", "CPUExecutionProvider"),
        ("DRIFTLINE_SLICE_RETIRE_AFTER_DAYS", "a fortnight", "valid number"),
        ("DRIFTLINE_SLICE_RETIRE_AFTER_DAYS", "-1", "greater than or equal to 0"),
        ("DRIFTLINE_SLICE_RETIRE_AFTER_DAYS", "inf", "finite"),
        ("DRIFTLINE_RETENTION_RESOLVED_DAYS", "1e12", "less than or equal to 36525"),
        ("DRIFTLINE_INCIDENT_GROUP_WINDOW_S", "1e15", "less than or equal to 31622400"),
        # a horizon of minutes would restart slices across ordinary gaps between events
        ("DRIFTLINE_SLICE_RETIRE_AFTER_DAYS", "0.001", "at least 1 hour"),
        # accepted once (only the scheme was checked), then `serve` died with redis-py's
        # "Port could not be cast to integer", or a bad db silently became db 0
        ("DRIFTLINE_REDIS_URL", "redis://h:port/0", "port is not a number from 1 to 65535"),
        ("DRIFTLINE_REDIS_URL", "redis://h:99999/0", "port is not a number from 1 to 65535"),
        ("DRIFTLINE_REDIS_URL", "redis://h:0/0", "port is not a number from 1 to 65535"),
        ("DRIFTLINE_REDIS_URL", "redis://h:6379/zero", "database number"),
        ("DRIFTLINE_REDIS_URL", "redis://h:6379/0?db=-1", "database number"),
        ("DRIFTLINE_REDIS_URL", "redis://h/0?socket_timeout=soon", "socket_timeout"),
        ("DRIFTLINE_REDIS_URL", "redis:///0", "no host"),
        ("DRIFTLINE_REDIS_URL", "unix://", "no socket path"),
        ("DRIFTLINE_REDIS_URL", "redis://[::1:6379/0", "not a URL"),
        ("DRIFTLINE_KAFKA_BOOTSTRAP", "h:99999", "port from 1 to 65535"),
        ("DRIFTLINE_KAFKA_BOOTSTRAP", "a:9092,b:0", "port from 1 to 65535"),
        # an infinite γ never alarms
        ("DRIFTLINE_BUDGET_PERIOD_DAYS", "inf", "finite"),
        ("DRIFTLINE_BUDGET_FALSE_INCIDENTS", "inf", "finite"),
        ("DRIFTLINE_BUDGET_FALSE_INCIDENTS", "nan", "finite"),
        ("DRIFTLINE_BUDGET_EVENT_RATE", "inf", "finite"),
        ("DRIFTLINE_INCIDENT_GROUP_WINDOW_S", "inf", "finite"),
        ("DRIFTLINE_RETENTION_RESOLVED_DAYS", "inf", "finite"),
        ("DRIFTLINE_STAGE_STALL_TIMEOUT_S", "nan", "finite"),
        ("DRIFTLINE_RECURRENCE_SIMILARITY", "nan", "finite"),
        # Alertmanager answers a push with an invalid label name with 400: every incident
        # would be dropped as rejected; one of the book's own would rename or reroute it
        ("DRIFTLINE_ALERT_LABELS", "deployment", "not name=value"),
        ("DRIFTLINE_ALERT_LABELS", "deploy-ment=a", "not a label name"),
        ("DRIFTLINE_ALERT_LABELS", "1st=a", "not a label name"),
        ("DRIFTLINE_ALERT_LABELS", "__name__=a", "not a label name"),
        ("DRIFTLINE_ALERT_LABELS", "=a", "not a label name"),
        ("DRIFTLINE_ALERT_LABELS", "deployment=a,station=b", "'station' is a label the failure "
                                                             "book sets itself"),
        ("DRIFTLINE_ALERT_LABELS", "severity=info", "sets itself"),
        ("DRIFTLINE_ALERT_LABELS", "alertname=X", "sets itself"),
        ("DRIFTLINE_ALERT_LABELS", "deployment=a,deployment=b", "given twice"),
        ("DRIFTLINE_ALERT_LABELS", "deployment=", "empty value"),
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
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [f"DRIFTLINE_{name.upper()}" for name in Settings.model_fields
               if f"DRIFTLINE_{name.upper()}" not in readme]
    assert not missing, f"README configuration table lacks {missing}"


def test_the_readme_configuration_table_is_the_generated_one() -> None:
    """Defaults and descriptions too, not only the names: the table between the README's
    config-table markers is `driftline config table`'s output."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("<!-- config-table:start -->\n")[1].split("<!-- config-table:end -->")[0]
    result = CliRunner().invoke(app, ["config", "table"])
    assert result.exit_code == 0, result.output
    assert table == result.output, "regenerate it: driftline config table"


def test_legal_urls_topics_and_providers_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIFTLINE_ALERTMANAGER_URL", "https://am.example:9093/prefix")
    monkeypatch.setenv("DRIFTLINE_ALERT_WEBHOOK_URL", "")  # empty: no webhook
    monkeypatch.setenv("DRIFTLINE_EVENTS_TOPIC", "plant-7.events_v2")
    monkeypatch.setenv("DRIFTLINE_ONNX_PROVIDERS", "CPUExecutionProvider")
    settings = load_settings()
    assert settings.alertmanager_url == "https://am.example:9093/prefix"
    assert settings.alert_webhook_url is None
    assert settings.events_topic == "plant-7.events_v2"


@pytest.mark.parametrize(("env", "url"), [
    ({}, "http://127.0.0.1:8080"),
    ({"DRIFTLINE_API_PORT": "9000"}, "http://127.0.0.1:9000"),
    ({"DRIFTLINE_API_HOST": "0.0.0.0", "DRIFTLINE_API_PORT": "81"}, "http://127.0.0.1:81"),  # noqa: S104
    ({"DRIFTLINE_API_HOST": "10.0.0.7"}, "http://10.0.0.7:8080"),
    ({"DRIFTLINE_API_HOST": "::1"}, "http://[::1]:8080"),
    ({"DRIFTLINE_API_PORT": "9000", "DRIFTLINE_PUBLIC_URL": "https://dl.plant:443"},
     "https://dl.plant:443"),
])
def test_alert_links_default_to_the_api_s_own_address(
        monkeypatch: pytest.MonkeyPatch, env: dict[str, str], url: str) -> None:
    """Unset, DRIFTLINE_PUBLIC_URL was a fixed http://127.0.0.1:8080, so with another
    DRIFTLINE_API_PORT every alert and incident link pointed at a port nothing served."""
    for name in ("DRIFTLINE_API_HOST", "DRIFTLINE_API_PORT", "DRIFTLINE_PUBLIC_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert load_settings().public_url == url


def test_a_port_given_on_the_command_line_moves_a_derived_public_url_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``driftline run --port 9001`` (or ``serve``) serves there: links follow unless
    DRIFTLINE_PUBLIC_URL says where the API is reached."""
    for name in ("DRIFTLINE_API_HOST", "DRIFTLINE_API_PORT", "DRIFTLINE_PUBLIC_URL"):
        monkeypatch.delenv(name, raising=False)
    moved = load_settings().serving_on(9001)
    assert (moved.api_port, moved.public_url) == (9001, "http://127.0.0.1:9001")
    assert load_settings().serving_on(None).public_url == "http://127.0.0.1:8080"
    # a stage run apart (`run book --port 9001`) serves probes there, not the API
    probes = load_settings().serving_on(9001, api=False)
    assert (probes.api_port, probes.public_url) == (9001, "http://127.0.0.1:8080")
    monkeypatch.setenv("DRIFTLINE_PUBLIC_URL", "https://dl.plant")
    moved = load_settings().serving_on(9001)
    assert (moved.api_port, moved.public_url) == (9001, "https://dl.plant")


@pytest.mark.parametrize("given", ["env, another case", "argument"])
def test_a_public_url_given_by_any_name_pydantic_reads_is_not_moved_by_the_port(
        monkeypatch: pytest.MonkeyPatch, given: str) -> None:
    """Whether DRIFTLINE_PUBLIC_URL was set was read from os.environ by that exact name, while
    the settings read the environment in any case (and take arguments): a URL given as
    driftline_public_url was replaced by the probe port's, and `run book` warned it unset."""
    for name in ("DRIFTLINE_API_HOST", "DRIFTLINE_API_PORT", "DRIFTLINE_PUBLIC_URL"):
        monkeypatch.delenv(name, raising=False)
    if given == "argument":
        settings = load_settings(public_url="https://dl.plant")
    else:
        monkeypatch.setenv("driftline_public_url", "https://dl.plant")
        settings = load_settings()
    assert settings.public_url == "https://dl.plant" and settings.public_url_set
    moved = settings.serving_on(9001)
    assert (moved.api_port, moved.public_url, moved.public_url_set) == (
        9001, "https://dl.plant", True)
    derived = load_settings(public_url="")
    assert not derived.public_url_set and not derived.serving_on(9001).public_url_set


def test_alert_labels_are_read_from_name_value_pairs_and_shown_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DRIFTLINE_ALERT_LABELS", raising=False)
    assert load_settings().alert_labels == {}  # unset: the book's alerts as before
    monkeypatch.setenv("DRIFTLINE_ALERT_LABELS", " deployment = plant-7 , site=Lyon=2,")
    settings = load_settings()
    assert settings.alert_labels == {"deployment": "plant-7", "site": "Lyon=2"}
    assert settings.shown()["alert_labels"] == "deployment=plant-7,site=Lyon=2"
    monkeypatch.setenv("DRIFTLINE_ALERT_LABELS", settings.shown()["alert_labels"])
    assert load_settings().alert_labels == settings.alert_labels  # reads back


def test_the_reserved_alert_labels_are_those_the_book_sets() -> None:
    """DRIFTLINE_ALERT_LABELS may not name a label Router.labels sets: the list it is checked
    against must not fall behind the router's."""
    root = SimpleNamespace(template="station+shift+lot",
                           dims=dict.fromkeys(SLICE_DIMENSIONS, "x"))
    incident = SimpleNamespace(id="DL-000001", severity=Severity.warning, root=root,
                               status=Status.open, active=True, timeline=[])
    plain = SimpleNamespace(alert_labels={})
    assert set(Router.labels(cast(Router, plain), cast(Incident, incident))) == set(
        BOOK_ALERT_LABELS)


def test_a_bad_value_stops_the_cli_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIFTLINE_ALERTMANAGER_URL", "http://:pw@")
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 2
    assert "DRIFTLINE_ALERTMANAGER_URL" in result.output and "pw" not in result.output


def test_config_show_masks_passwords_in_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIFTLINE_REDIS_URL", "redis://:s3cret-pw@redis.plant:6379/0")
    monkeypatch.setenv("DRIFTLINE_ALERTMANAGER_URL", "https://bot:am-pass@am.plant/")
    monkeypatch.setenv("DRIFTLINE_API_TOKENS", "ana:operator:0123456789abcdef0123")
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 0, result.output
    assert "s3cret-pw" not in result.output and "am-pass" not in result.output
    assert "0123456789abcdef" not in result.output
    assert "DRIFTLINE_REDIS_URL=redis://:***@redis.plant:6379/0" in result.output
    assert "DRIFTLINE_ALERTMANAGER_URL=https://bot:***@am.plant/" in result.output


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://user:p%40ss@h:6379/1", "redis://user:***@h:6379/1"),
    ("rediss://:pa@ss@h/0", "rediss://:***@h/0"),  # a raw '@' in the password
    ("redis://:pa/ss@h/0", "redis://:***@h/0"),  # a raw '/' in the password
    ("unix:///run/redis.sock?db=2&password=pw&x=1", "unix:///run/redis.sock?db=2&password=***&x=1"),
    ("redis://h:6379/0", "redis://h:6379/0"),
    ("http://h/a@b", "http://h/a@b"),
])
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_unavailable_onnx_providers_are_named_where_a_model_is_loaded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Accepted once, then onnxruntime quietly ran on the CPU. Checked where a model is loaded,
    not in the settings: an API or book pod sharing a GPU config needs no provider."""
    from driftline.config import unknown_onnx_providers

    monkeypatch.setenv("DRIFTLINE_ONNX_PROVIDERS", "Bogus,CPUExecutionProvider")
    settings = load_settings()  # every role reads the settings
    problem = unknown_onnx_providers(settings.onnx_providers)
    assert problem is not None
    assert "DRIFTLINE_ONNX_PROVIDERS: Bogus not available" in problem
    assert "CPUExecutionProvider" in problem.split("this onnxruntime has")[1]
    assert unknown_onnx_providers(["CPUExecutionProvider"]) is None


def test_slice_retirement_is_on_by_default_and_0_turns_it_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DRIFTLINE_SLICE_RETIRE_AFTER_DAYS", raising=False)
    assert load_settings().slice_retire_after_days == 14.0
    monkeypatch.setenv("DRIFTLINE_SLICE_RETIRE_AFTER_DAYS", "0")
    assert load_settings().slice_retire_after_days == 0.0
    monkeypatch.setenv("DRIFTLINE_SLICE_RETIRE_AFTER_DAYS", "0.5")
    assert load_settings().slice_retire_after_days == 0.5


def test_empty_path_settings_are_not_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty path was Path("") — the cwd: `reference build` then failed with
    IsADirectoryError '.', an empty reference dir skipped the "not set" message, and the cache
    went to the cwd."""
    from driftline.config import default_cache_dir

    for name in ("DRIFTLINE_MODEL_PATH", "DRIFTLINE_REFERENCE_DIR", "DRIFTLINE_CACHE_DIR"):
        monkeypatch.setenv(name, "")
    settings = load_settings()
    assert settings.model_path is None and settings.reference_dir is None
    assert settings.cache_dir == default_cache_dir()
    assert settings.resolved_model_path() == default_cache_dir() / "mobilenet_v2_demo.onnx"


@pytest.mark.parametrize("url", [
    "redis://:s3cret@redis.plant:6379/0", "rediss://user:p%40ss@h/1", "redis://h", "redis://h/",
    "redis://[::1]:6380/15", "unix:///run/redis.sock?db=2&password=pw",
])
def test_legal_redis_urls_pass(url: str) -> None:
    assert load_settings(redis_url=url).redis_url == url


def test_a_bad_redis_url_is_named_without_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    # a raw '/' in the password ends the host: redis-py would read "pa" as the port
    monkeypatch.setenv("DRIFTLINE_REDIS_URL", "redis://:pa/ss@h/0")
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "DRIFTLINE_REDIS_URL: " in message and "percent-encode" in message
    assert "pa/ss" not in message and "'pa'" not in message


@pytest.mark.parametrize(("settings", "gamma"), [
    # 1e10 false incidents a month: a detector would alarm every 0.2 events
    ({"budget_false_incidents": 1e10}, "γ = 0.207 to 0.518"),
    ({"budget_event_rate": 1e-12, "budget_slices": 1}, "γ = 5.18e-06 to 1.3e-05"),
    ({"budget_false_incidents": 1e-310}, "to inf"),  # overflows: never alarms
])
def test_a_budget_without_a_usable_arl0_names_its_settings(
        settings: dict[str, float], gamma: str) -> None:
    """γ <= 1 raised "need arl0 > 1" only when the detect stage created its first slice."""
    with pytest.raises(ConfigError) as info:
        load_settings(**settings)
    message = str(info.value)
    assert ("DRIFTLINE_BUDGET_FALSE_INCIDENTS, DRIFTLINE_BUDGET_PERIOD_DAYS, "
            "DRIFTLINE_BUDGET_SLICES, DRIFTLINE_BUDGET_EVENT_RATE: ") in message
    assert gamma in message and "must be above 1 and finite" in message


def test_the_budget_settings_give_the_detectors_arl0() -> None:
    from driftline.runner import detector_arl0

    settings = load_settings(budget_false_incidents=2, budget_period_days=7, budget_slices=50,
                             budget_event_rate=0.5)
    assert detector_arl0(settings, 5) == pytest.approx(0.5 * 7 * 86400 * 50 * 5 / 2)
    # the smallest budget accepted still gives every detector a usable threshold
    from driftline.core.cusum import union_threshold

    tight = load_settings(budget_false_incidents=1e9)
    assert union_threshold(detector_arl0(tight, 2), 8) > 0


def test_config_show_reads_back_as_the_same_settings(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Unset values printed as None (refused when read back) and lists as Python lists (read
    back as one provider named "['CPUExecutionProvider']")."""
    import os

    monkeypatch.setenv("DRIFTLINE_SLICE_TEMPLATES", "station, station+lot")
    monkeypatch.setenv("DRIFTLINE_ONNX_PROVIDERS", "CUDAExecutionProvider,CPUExecutionProvider")
    monkeypatch.setenv("DRIFTLINE_MODEL_PATH", str(tmp_path))
    monkeypatch.setenv("DRIFTLINE_BUDGET_EVENT_RATE", "0.25")
    monkeypatch.setenv("DRIFTLINE_LOG_FORMAT", "console")
    monkeypatch.setenv("DRIFTLINE_OPEN_PROBES", "false")
    monkeypatch.setenv("DRIFTLINE_REDIS_URL", "unix:///run/redis.sock?db=2")
    monkeypatch.setenv("DRIFTLINE_IMAGE_ROOTS", "/srv/images, /mnt/cams")
    for name in ("DRIFTLINE_ALERTMANAGER_URL", "DRIFTLINE_API_TOKENS",
                 "DRIFTLINE_REFERENCE_DIR"):
        monkeypatch.delenv(name, raising=False)
    before = load_settings()
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 0, result.output
    assert "DRIFTLINE_ALERTMANAGER_URL=\n" in result.output
    assert "DRIFTLINE_ONNX_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider\n" in result.output
    for name in list(os.environ):
        if name.startswith("DRIFTLINE_"):
            monkeypatch.delenv(name)
    for line in result.output.splitlines():
        name, _, value = line.partition("=")
        monkeypatch.setenv(name, value)
    assert load_settings().model_dump() == before.model_dump()


def test_image_roots_are_comma_separated_and_unset_by_default(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DRIFTLINE_IMAGE_ROOTS", raising=False)
    assert load_settings().image_roots == []
    monkeypatch.setenv("DRIFTLINE_IMAGE_ROOTS", "/srv/images, /mnt/cams,")
    assert load_settings().image_roots == ["/srv/images", "/mnt/cams"]
