"""Service configuration: one validated ``Settings``, every option a ``DRIFTLINE_*`` variable.

Build it with :func:`get_settings`; a bad value raises :class:`ConfigError` whose message names
the environment variable, so start-up stops with a line an operator can act on.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Sequence
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Self
from urllib.parse import urlsplit

from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from driftline.core.budget import DAY, Budget

ENV_PREFIX = "DRIFTLINE_"
ROLES = ("viewer", "operator", "admin")
SLICE_DIMENSIONS = ("station", "shift", "lot")
# the shortest retirement horizon: the gauges read the last hour of a slice's events
MIN_RETIRE_AFTER_DAYS = 1 / 24
# the detectors a slice runs, which the false-alarm budget is split over: cluster mix and OOD
# rate always, prediction mix, confidence and error rate as the reference allows
# (runner.ReferenceBaselines.detectors)
SLICE_DETECTORS = (2, 5)
_BUDGET_VARIABLES = ", ".join(f"{ENV_PREFIX}BUDGET_{name}" for name in (
    "FALSE_INCIDENTS", "PERIOD_DAYS", "SLICES", "EVENT_RATE"))
_PLACEHOLDER_SECRETS = {"changeme", "change-me", "secret", "password", "token", "xxx", "todo"}
# Kafka's own rule (kafka.common.internals.Topic): at most 249 of these, and not "." or "..".
_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")
_QUERY_PASSWORD = re.compile(r"((?:^|&)password=)[^&]*", re.IGNORECASE)
# Prometheus's (and Alertmanager's) label names; ``__`` starts the names it keeps for itself
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# The labels the failure book puts on its own DriftlineIncident alerts (alerts.routing.Router
# .labels): an incident's identity, routing and inhibition in Alertmanager, not to be replaced
BOOK_ALERT_LABELS = ("alertname", "incident_id", "severity", "status", "root_template",
                     *SLICE_DIMENSIONS)


def default_cache_dir() -> Path:
    """Where built models, demo data and Kafka jars live unless ``DRIFTLINE_CACHE_DIR`` says."""
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "driftline"


class ConfigError(ValueError):
    """A setting is invalid; the message names the environment variable."""


class LogFormat(StrEnum):
    json = "json"
    console = "console"


class ApiToken:
    """One bearer token from configuration; only its sha256 is kept in memory."""

    __slots__ = ("name", "role", "sha256")

    def __init__(self, name: str, role: str, token: str) -> None:
        self.name = name
        self.role = role
        self.sha256 = hashlib.sha256(token.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"ApiToken(name={self.name!r}, role={self.role!r})"


# Upper bounds for durations that become timedeltas (which overflow past ~2.7 million years):
# beyond these, a value is a typo in units, not a policy.
_YEAR_S = 366 * 86400.0
_CENTURY_DAYS = 36_525.0


class Settings(BaseSettings):
    """All of driftline's options. The README's configuration table documents each one."""

    # no setting means anything at inf or nan (an infinite budget period: no detector alarms)
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=None, extra="ignore", validate_default=True,
        allow_inf_nan=False,
    )
    # DRIFTLINE_PUBLIC_URL was not given (by any name pydantic reads it from: the environment,
    # in any case, or an argument) and public_url is the API's own address
    _public_url_derived: bool = PrivateAttr(default=False)

    # Kafka
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers")
    events_topic: str = Field("driftline.events", description="Inference events in")
    slice_updates_topic: str = Field("driftline.slice-updates", description="Internal topic")
    alerts_topic: str = Field("driftline.alerts", description="Incident state changes out")
    dlq_topic: str = Field("driftline.events.dlq", description="Dead-letter topic")
    embed_group: str = Field("driftline-embed", description="Embed-stage consumer group")
    detect_group: str = Field("driftline-detect", description="Detect-stage consumer group")
    topic_partitions: int = Field(4, ge=1, le=1024, description=(
        "Partitions for the events and slice-updates topics driftline creates (the dead-letter "
        "and alerts topics get 1)"))
    kafka_session_timeout_ms: int = Field(
        20_000, ge=6_000, le=1_800_000,
        description="How long a group waits for a crashed worker before moving its partitions "
                    "(heartbeats wait while a detect worker writes its checkpoint of revoked "
                    "partitions; it gives up on an unreachable Redis within half of this)")
    # Stores and peers
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Failure book and state")
    alertmanager_url: str | None = Field(None, description="Alertmanager base URL (push alerts)")
    public_url: str = Field("", description=(
        "Base URL used in alert links; empty: the API's own address, "
        "http://DRIFTLINE_API_HOST:DRIFTLINE_API_PORT (127.0.0.1 when the host binds every "
        "address; `serve --port` or `run all --port` moves it). Set it for a book run apart "
        "from the API (`run book` warns at start-up when it is not set)"))
    # Model and reference
    cache_dir: Path = Field(default_factory=default_cache_dir, description="Build cache")
    model_path: Path | None = Field(None, description="ONNX model; default: the demo model")
    reference_dir: Path | None = Field(None, description="Active reference artifact directory")
    onnx_providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["CPUExecutionProvider"], description="onnxruntime providers"
    )
    onnx_threads: int = Field(0, ge=0, le=256, description="Intra-op threads (0 = all cores)")
    embed_batch_size: int = Field(32, ge=1, le=1024, description="Images per model call")
    embed_batch_timeout_ms: int = Field(200, ge=1, le=60_000, description="Max batch wait")
    max_event_bytes: int = Field(8 << 20, ge=1024, description="Largest accepted event")
    recent_buffer_size: int = Field(
        5000, ge=0, description="Recent embeddings kept in Redis for similarity search"
    )
    late_label_hours: float = Field(
        168.0, gt=0, le=_YEAR_S / 3600, description="How long each inference event's "
        "prediction and slices are kept in Redis for its late label (and its id, to skip a "
        "duplicate): one ~280-425 B key per event, so Redis holds 1.0-1.5 MB per event/s per "
        "hour of this (170-260 MB at 168); a label later than this is dead-lettered as "
        "unknown_event")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Largest decoded image")
    image_roots: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Directories that file:// image URIs must lie in, "
        "for the embed stage and the API's thumbnails: comma-separated absolute paths (empty: "
        "any regular file outside /proc, /sys and /dev but /dev/shm)")
    # Detection
    slice_templates: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["station", "station+shift", "shift", "lot"],
        description="Slice templates: dimension names joined by '+'",
    )
    budget_false_incidents: float = Field(1.0, gt=0, description="False incidents per period")
    budget_period_days: float = Field(30.0, gt=0, le=_CENTURY_DAYS,
                                      description="Budget period in days")
    budget_slices: int = Field(
        200, ge=1, description="Slices the fleet budget is shared over, counted as stations x "
        "slice templates: each event updates one slice per template, so a shift or lot slice "
        "reading n stations counts n times"
    )
    budget_event_rate: float = Field(
        2.0, gt=0, description="Expected events/s per station, for the budget"
    )
    autoresolve_events: int = Field(
        500, ge=1, description="Events without a re-crossing before a slice's alarm clears "
        "(and its incident can auto-resolve): at least this many, at least 3x the events its "
        "slowest crossing took, and with the detector back near its no-drift level"
    )
    checkpoint_interval_ms: int = Field(1000, ge=10, description="Detect checkpoint period")
    # 14 days: longer than a lot runs or waits between its runs, and than a station's planned
    # downtime while the rest of the plant works, yet 50 new lots a day leave ~700 slices held
    # (a few MB), not every lot ever seen. Event time: a whole-plant stop retires nothing.
    slice_retire_after_days: float = Field(
        14.0, ge=0, le=_CENTURY_DAYS,
        description="A slice with no event for this many days of event time (behind the newest "
                    "event of its partition) and no open alarm is retired: its state and "
                    "summary are deleted; it starts afresh if its events come back. 0 keeps "
                    "every slice")
    stage_stall_timeout_s: float = Field(
        600.0, ge=120, description="A stage loop that has not turned this long, or a consumer "
                                   "not settled in its group this long, fails /healthz")
    # Failure book and alert routing
    incident_group_window_s: float = Field(
        3600.0, gt=0, le=_YEAR_S,
        description="Event-time window in which alarms join one incident")
    incident_hold_max_s: float = Field(
        600.0, ge=0, le=_YEAR_S,
        description="An incident the co-occurrence attribution opens (split off, or a new root) "
                    "is held (not paged) until it is stable, or for at most this long of "
                    "event time (of wall time if no event comes)")
    incident_stable_events: int = Field(
        30, ge=0, description="A held incident pages once the co-occurrence attribution has "
                              "named a root in it at every batch while such a root counted this "
                              "many more events")
    attribution_tolerance: float = Field(
        0.75, gt=0, le=1, description="How much weaker a slice may be and still be explained")
    attribution_clean_events: int = Field(
        50, ge=1, description="Events a sibling slice needs to count as clean")
    recurrence_similarity: float = Field(
        0.8, ge=0, le=1, description="Evidence cosine similarity for 'seen before'")
    incident_max_exemplars: int = Field(32, ge=1, description="Exemplars kept per incident")
    retention_resolved_count: int = Field(10_000, ge=1, description="Resolved incidents kept")
    retention_resolved_days: float = Field(90.0, gt=0, le=_CENTURY_DAYS,
                                           description="Resolved incidents' max age")
    alert_webhook_url: str | None = Field(None, description="Optional webhook for state changes")
    alert_webhook_attempts: int = Field(
        4, ge=1, le=20, description="Webhook delivery attempts per change and round, on a "
                                    "transient failure (no answer, 5xx, 408, 429)")
    alert_labels: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="Labels added to every alert the failure book sends "
        "(its Alertmanager alerts; `alert_labels` in its alerts-topic and webhook messages): "
        "comma-separated name=value, e.g. deployment=plant-7. Give `deployment` the value of "
        "the Prometheus external label, so that deployments sharing an Alertmanager do not "
        "inhibit or merge each other's incidents")
    # API
    api_host: str = Field("127.0.0.1", description="API bind address")
    api_port: int = Field(8080, ge=1, le=65535, description="API port")
    api_tokens: SecretStr | None = Field(
        None, description="Bearer tokens: 'name:role:token' entries separated by commas"
    )
    open_probes: bool = Field(True, description=(
        "/healthz, /readyz, /metrics need no token, in processes that serve the API (serve, run "
        "all); a single stage's process serves only these, always open"))
    max_request_bytes: int = Field(1 << 20, ge=1024, description="Largest API request body")
    # Logs
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING, ERROR")
    log_format: LogFormat = Field(LogFormat.json, description="json or console")

    @field_validator("model_path", "reference_dir", mode="before")
    @classmethod
    def _empty_path_is_unset(cls, value: Any) -> Any:
        # as for the URLs: `DRIFTLINE_MODEL_PATH=` means not set, not Path("") (the cwd)
        return None if value == "" else value

    @field_validator("cache_dir", mode="before")
    @classmethod
    def _empty_cache_dir_is_default(cls, value: Any) -> Any:
        return default_cache_dir() if value == "" else value

    @field_validator("onnx_providers", "slice_templates", "image_roots", mode="before")
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("alert_labels", mode="before")
    @classmethod
    def _split_labels(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        labels: dict[str, str] = {}
        for entry in filter(None, (part.strip() for part in value.split(","))):
            name, eq, label = (text.strip() for text in entry.partition("="))
            if not eq:
                raise ValueError(f"{entry!r} is not name=value")
            if name in labels:
                raise ValueError(f"label {name!r} is given twice")
            labels[name] = label
        return labels

    @field_validator("alert_labels")
    @classmethod
    def _check_labels(cls, value: dict[str, str]) -> dict[str, str]:
        for name, label in value.items():
            if not _LABEL_NAME.fullmatch(name) or name.startswith("__"):
                raise ValueError(f"{name!r} is not a label name: a letter or '_', then letters, "
                                 "digits and '_' (and no leading '__', kept for Prometheus)")
            if name in BOOK_ALERT_LABELS:
                raise ValueError(f"{name!r} is a label the failure book sets itself (one of "
                                 f"{', '.join(BOOK_ALERT_LABELS)})")
            if not label:  # Alertmanager drops an empty label: it would label nothing
                raise ValueError(f"label {name!r} has an empty value")
        return value

    @field_validator("image_roots")
    @classmethod
    def _absolute_roots(cls, value: list[str]) -> list[str]:
        relative = [v for v in value if not Path(v).is_absolute()]
        if relative:  # relative to a worker's working directory would mean nothing
            raise ValueError(f"must be absolute paths, got {', '.join(relative)}")
        return value

    @field_validator("slice_templates")
    @classmethod
    def _check_templates(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one slice template is needed")
        for template in value:
            dims = template.split("+")
            unknown = [d for d in dims if d not in SLICE_DIMENSIONS]
            if unknown or len(set(dims)) != len(dims):
                raise ValueError(
                    f"template {template!r}: use dimensions from {SLICE_DIMENSIONS} joined by '+'"
                )
        return value

    @field_validator("slice_retire_after_days")
    @classmethod
    def _check_retire_after(cls, value: float) -> float:
        if 0 < value < MIN_RETIRE_AFTER_DAYS:
            raise ValueError("0 (never retire) or at least 1 hour (0.0417 days): a shorter "
                             "horizon restarts slices across ordinary gaps in their events "
                             "and empties the last-hour gauges")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("use DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level

    @field_validator("kafka_bootstrap")
    @classmethod
    def _check_bootstrap(cls, value: str) -> str:
        for server in value.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(f"{server!r} is not host:port with a port from 1 to 65535")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis(cls, value: str) -> str:
        return _redis_url(value)

    @field_validator("events_topic", "slice_updates_topic", "alerts_topic", "dlq_topic")
    @classmethod
    def _check_topic(cls, value: str) -> str:
        if not _TOPIC_NAME.fullmatch(value) or value in (".", ".."):
            raise ValueError(f"{value!r} is not a Kafka topic name: 1 to 249 of a-z A-Z 0-9 "
                             "'.' '_' '-'")
        return value

    @field_validator("embed_group", "detect_group", "api_host")
    @classmethod
    def _check_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str) -> str:
        return _http_url(value) if value else ""  # empty: the API's own, below

    @model_validator(mode="after")
    def _default_public_url(self) -> Self:
        # A link to the port the API listens on, not a fixed 8080 that another
        # DRIFTLINE_API_PORT left pointing elsewhere.
        if not self.public_url:
            self.public_url = api_url(self.api_host, self.api_port)
            self._public_url_derived = True
        return self

    @property
    def public_url_set(self) -> bool:
        """Whether DRIFTLINE_PUBLIC_URL was given, not derived from the API's address."""
        return not self._public_url_derived

    def serving_on(self, port: int | None, *, api: bool = True) -> Self:
        """These settings with this process's HTTP server on ``port`` (``--port``) instead. A
        public URL that was not set follows it if the process serves the API (``api``); a
        stage run apart (``run book``) serves probes only there, and its alert links keep
        the API's configured address."""
        if port is None or port == self.api_port:
            return self
        moved = self.model_copy(update={"api_port": port})
        if api and not self.public_url_set:
            moved.public_url = api_url(self.api_host, port)
        return moved

    @field_validator("alertmanager_url", "alert_webhook_url")
    @classmethod
    def _check_optional_url(cls, value: str | None) -> str | None:
        return _http_url(value) if value else None  # empty: not configured

    @field_validator("onnx_providers")
    @classmethod
    def _check_providers(cls, value: list[str]) -> list[str]:
        # whether this onnxruntime has them is checked where a model is loaded
        # (unknown_onnx_providers): an API or book pod sharing the config needs none
        if not value:
            raise ValueError("name at least one, e.g. CPUExecutionProvider")
        return value

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _empty_tokens_are_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("api_tokens")
    @classmethod
    def _check_tokens(cls, value: SecretStr | None) -> SecretStr | None:
        parse_tokens(value)  # raises ValueError naming the bad entry
        return value

    @model_validator(mode="after")
    def _check_budget(self) -> Self:
        # union_threshold needs γ > 1 (it raised only when the first slice was created), and an
        # infinite γ never alarms; γ grows with the detectors a slice runs
        low, high = (self.budget(d).arl0() for d in SLICE_DETECTORS)
        if low <= 1 or not math.isfinite(high):
            raise ValueError(
                f"{_BUDGET_VARIABLES}: {self.budget_false_incidents:g} false incidents per "
                f"{self.budget_period_days:g} days over {self.budget_slices} slices at "
                f"{self.budget_event_rate:g} events/s give a detector γ = {low:.3g} to "
                f"{high:.3g} events between false alarms; it must be above 1 and finite")
        return self

    def budget(self, detectors: int) -> Budget:
        """The operator's false-alarm budget, split over ``detectors`` per slice."""
        return Budget(false_incidents=self.budget_false_incidents,
                      period_s=self.budget_period_days * DAY, n_slices=self.budget_slices,
                      detectors_per_slice=detectors, event_rate=self.budget_event_rate)

    def shown(self) -> dict[str, str]:
        """The settings to print, as the environment gives them (unset: empty; lists: comma-
        separated), so that the output reads back as an env file; secrets masked, and so are
        the passwords in URLs (fill those in before reading it back)."""
        return {name: _env_value(value) for name, value in self.model_dump().items()}

    def tokens(self) -> list[ApiToken]:
        """The configured bearer tokens (hashed)."""
        return parse_tokens(self.api_tokens)

    def resolved_model_path(self) -> Path:
        return self.model_path or self.cache_dir / "mobilenet_v2_demo.onnx"


def api_url(host: str, port: int) -> str:
    """The API's own base URL: ``host`` (127.0.0.1 for one that binds every address) and
    ``port``."""
    host = host.strip("[]")
    # reading a bind address, not binding one
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _http_url(value: str) -> str:
    try:
        parts = urlsplit(value)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and (
            value == value.strip())
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in range
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{mask_url(value)!r} is not an http:// or https:// URL with a host")
    return value


def _env_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):  # NoDecode: read back by _split_csv
        return ",".join(value)
    if isinstance(value, dict):  # read back by _split_labels
        return ",".join(f"{name}={label}" for name, label in value.items())
    if isinstance(value, str) and "://" in value:
        return mask_url(value)
    return str(value)  # a SecretStr shows as ********** (or empty)


def _redis_url(value: str) -> str:
    """``value`` if redis-py reads it as the server meant: a host (``redis://``, ``rediss://``)
    or a socket path (``unix://``), a port from 1 to 65535, a database number. redis-py refuses a
    bad port only when a client is made, and reads db 0 from a path that is not a number."""
    from redis.connection import parse_url

    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must start with redis://, rediss:// or unix://")
    shown = f"{mask_url(value)!r}"
    # a raw '/', '?' or '#' in a password ends the host early: its port is then the password's
    encode = " (percent-encode a '/', '?', '#' or '@' in a password)" if "@" in value else ""
    try:
        parts = urlsplit(value)
    except ValueError:  # an unclosed '[' of an IPv6 host
        raise ValueError(f"{shown}: not a URL{encode}") from None
    try:
        port = parts.port
    except ValueError:  # not a number or above 65535 (urllib's message quotes the port text)
        port = 0
    if port == 0:
        raise ValueError(f"{shown}: the port is not a number from 1 to 65535{encode}")
    try:
        # what redis.Redis.from_url reads: refuses a bad query value
        kwargs = parse_url(value)  # type: ignore[no-untyped-call]
    except ValueError as err:
        raise ValueError(f"{shown}: {err}") from None
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"{shown}: no socket path (unix:///path/to/redis.sock)")
    elif not parts.hostname:
        raise ValueError(f"{shown}: no host{encode}")
    elif parts.path not in ("", "/") and not parts.path[1:].isdigit():
        raise ValueError(f"{shown}: the path must be a database number (/0){encode}")
    if kwargs.get("db", 0) < 0:
        raise ValueError(f"{shown}: the database number must be 0 or more")
    return value


def mask_url(url: str) -> str:
    """``url`` with its passwords as ``***``: the userinfo's (``scheme://user:pw@host``) and a
    ``password`` query parameter (redis-py reads one: ``unix:///run/redis.sock?password=``).
    Works on the text, so the rest of the URL is shown exactly as configured."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # the host starts after the last '@' before the query, even if a password has a raw '/'
    start = rest.partition("?")[0].partition("#")[0].rfind("@") + 1
    end = min((i for i in (rest.find(c, start) for c in "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, host = netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if at and colon:
        netloc = f"{user}:***@{host}"
    path, question, query = tail.partition("?")
    query, hash_, fragment = query.partition("#")
    query = _QUERY_PASSWORD.sub(r"\1***", query)
    return f"{scheme}://{netloc}{path}{question}{query}{hash_}{fragment}"


def parse_tokens(secret: SecretStr | None) -> list[ApiToken]:
    """Parse 'name:role:token,...'; placeholder or short (< 16 chars) secrets are refused, and
    so are a token outside printable ASCII (the header is read as Latin-1: a UTF-8 'ø' arrives
    as 'Ã¸' and never matches) and one given twice (its caller got the first entry's name and
    role, whichever was meant)."""
    if secret is None:
        return []
    out: list[ApiToken] = []
    for entry in secret.get_secret_value().split(","):
        if not entry.strip():
            continue
        parts = entry.strip().split(":", 2)
        if len(parts) != 3:
            raise ValueError("each entry is 'name:role:token'")
        name, role, token = parts
        if role not in ROLES:
            raise ValueError(f"role of {name!r} must be one of {ROLES}")
        if token.lower() in _PLACEHOLDER_SECRETS or len(token) < 16:
            raise ValueError(f"token of {name!r} is a placeholder or shorter than 16 characters")
        if not all("!" <= c <= "~" for c in token):
            raise ValueError(f"token of {name!r} has a space or a character outside ASCII "
                             "(such as 'ø'); a bearer token is printable ASCII (RFC 6750), e.g. "
                             "`openssl rand -hex 24`")
        made = ApiToken(name, role, token)
        same = next((t for t in out if t.sha256 == made.sha256), None)
        if same is not None:
            raise ValueError(f"the tokens of {same.name!r} and {name!r} are the same token "
                             "given twice: give each entry its own")
        out.append(made)
    return out


def _describe(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        if not item["loc"]:  # a check across settings: its message names them
            lines.append(item["msg"].removeprefix("Value error, "))
            continue
        lines.append(f"{ENV_PREFIX}{str(item['loc'][0]).upper()}: {item['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Build ``Settings`` from the environment plus ``overrides``; raise :class:`ConfigError`."""
    try:
        return Settings(**overrides)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached); tests call :func:`load_settings` instead."""
    return load_settings()


def unknown_onnx_providers(providers: Sequence[str]) -> str | None:
    """Why ``providers`` (``DRIFTLINE_ONNX_PROVIDERS``) cannot be used by this onnxruntime, or
    ``None``: onnxruntime itself would quietly fall back to the CPU."""
    import onnxruntime  # only where a model is loaded

    available = onnxruntime.get_available_providers()
    unknown = [p for p in providers if p not in available]
    if not unknown:
        return None
    return (f"DRIFTLINE_ONNX_PROVIDERS: {', '.join(unknown)} not available (onnxruntime would "
            f"quietly fall back to CPU); this onnxruntime has {', '.join(available)}")
