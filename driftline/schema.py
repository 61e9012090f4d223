"""Types shared by every part: inference events, dead-letter records, slice updates.

An event (DESIGN.md §2) is UTF-8 JSON on ``driftline.events``. :func:`parse_event` turns raw
bytes into an :class:`Event` or raises :class:`EventRejected` with a machine-readable
:class:`RejectReason`, which the stream writes to the dead-letter topic as a
:class:`DeadLetter` record and goes on.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal
from urllib.parse import unquote

import pybase64
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    ValidationError,
    field_validator,
    model_validator,
)

MAX_ID_CHARS = 200
MAX_SLICE_CHARS = 128
MAX_EMBEDDING_DIM = 16_384
FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max
# Event times outside these years are typos or garbage; the bounds also keep event-time
# arithmetic (buckets, windows, Redis scores) far from datetime's year 1 and 9999.
MIN_EVENT_YEAR, MAX_EVENT_YEAR = 1970, 9000
DEFAULT_MAX_EVENT_BYTES = 8 << 20

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _printable(value: str) -> str:
    """``value`` without surrounding whitespace (a trailing newline a sender read from a file
    is no reason to lose an event); control characters inside it are refused: these end up
    in Redis keys, logs and the UI.

    >>> _printable("scratch\\n")
    'scratch'
    """
    stripped = value.strip()
    if value and not stripped:
        raise ValueError("must not be blank")
    if _CONTROL.search(stripped):
        raise ValueError("must not contain control characters")
    return stripped


Text = Annotated[str, AfterValidator(_printable)]

SliceValue = Annotated[
    str, Field(min_length=1, max_length=MAX_SLICE_CHARS, pattern=r"^[^\x00-\x1f|=]+$")
]


class RejectReason(StrEnum):
    """Why an event went to the dead-letter topic (a bounded label for metrics)."""

    oversized_event = "oversized_event"
    invalid_utf8 = "invalid_utf8"
    malformed_json = "malformed_json"
    not_an_object = "not_an_object"
    missing_field = "missing_field"
    invalid_field = "invalid_field"
    payload_conflict = "payload_conflict"
    image_undecodable = "image_undecodable"
    image_too_large = "image_too_large"
    embedding_dim = "embedding_dim"
    embedding_not_finite = "embedding_not_finite"
    unknown_reference = "unknown_reference"
    unknown_event = "unknown_event"
    store_unavailable = "store_unavailable"
    processing_failed = "processing_failed"


class EventRejected(ValueError):
    """An event cannot be processed; ``reason`` is a :class:`RejectReason`."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class Prediction(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str = Field(min_length=1, max_length=MAX_SLICE_CHARS)
    score: float = Field(ge=0.0, le=1.0)


def parse_rfc3339(value: Any) -> datetime:
    """RFC 3339: a string with a date, a time and an offset (``Z`` or ``±hh:mm``), in the years
    ``MIN_EVENT_YEAR``–``MAX_EVENT_YEAR`` once in UTC.

    ``t`` and ``z`` may be lower case, as RFC 3339 §5.6 allows. The other ISO 8601 forms that
    :meth:`datetime.fromisoformat` reads (no seconds, a basic-format offset) are accepted too:
    they name one instant, and refusing them would dead-letter a frame for its spelling.

    >>> parse_rfc3339("2026-11-23t08:00:00.5z").isoformat()
    '2026-11-23T08:00:00.500000+00:00'
    """
    if not isinstance(value, str) or "T" not in value.upper():
        raise ValueError("must be an RFC 3339 date-time string such as 2026-11-23T08:00:00Z")
    try:
        parsed = datetime.fromisoformat(value.upper())
    except ValueError:
        raise ValueError(f"{value!r} is not an RFC 3339 date-time") from None
    if parsed.tzinfo is None:
        raise ValueError("needs a UTC offset ('Z' or '+hh:mm')")
    try:
        utc = parsed.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:30:00-01:00: past datetime's range in UTC
        utc = None
    if utc is None or not MIN_EVENT_YEAR <= utc.year <= MAX_EVENT_YEAR:
        raise ValueError(f"{value!r} is outside the years {MIN_EVENT_YEAR}-{MAX_EVENT_YEAR} (UTC)")
    return utc


class Event(BaseModel):
    """One inference event, or a late label for an earlier one (same ``event_id``)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_id: Text = Field(min_length=1, max_length=MAX_ID_CHARS)
    ts: datetime
    station: SliceValue
    shift: SliceValue
    lot: SliceValue
    model_version: Text | None = Field(None, max_length=MAX_SLICE_CHARS)
    prediction: Prediction | None = None
    label: Text | None = Field(None, min_length=1, max_length=MAX_SLICE_CHARS)
    loss: float | None = None
    image: str | None = Field(None, min_length=1, description="base64 JPEG or PNG")
    image_uri: str | None = Field(None, pattern=r"^file://.+", max_length=4096)
    # strict: numbers only, not "0.5" or true (JSON integers are numbers)
    embedding: list[StrictFloat] | None = Field(None, min_length=1, max_length=MAX_EMBEDDING_DIM)

    _ts_check = field_validator("ts", mode="before")(lambda v: parse_rfc3339(v))

    @field_validator("loss")
    @classmethod
    def _finite_loss(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be finite")
        return value

    @field_validator("embedding")
    @classmethod
    def _finite_embedding(cls, value: list[float] | None) -> list[float] | None:
        # embeddings are float32 (faiss): a larger value would become inf there
        if value is not None and not all(math.isfinite(x) and abs(x) <= FLOAT32_MAX
                                         for x in value):
            raise ValueError(f"must contain only finite numbers of at most {FLOAT32_MAX:.4g} "
                             "in magnitude (float32)")
        return value

    @field_validator("image")
    @classmethod
    def _base64(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                pybase64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("is not valid base64") from None
        return value

    @field_validator("prediction")
    @classmethod
    def _printable_label(cls, value: Prediction | None) -> Prediction | None:
        # here, not in Prediction: slice-updates written before this check carry it too
        if value is not None and (label := _printable(value.label)) != value.label:
            return value.model_copy(update={"label": label})
        return value

    @field_validator("image_uri")
    @classmethod
    def _plain_path(cls, value: str | None) -> str | None:
        # a NUL makes open() raise ValueError; no file name needs a control character
        if value is not None and _CONTROL.search(unquote(value)):
            raise ValueError("must not contain control characters (percent-encoded or not)")
        return value

    @model_validator(mode="after")
    def _one_payload(self) -> Event:
        payloads = [f for f in ("image", "image_uri", "embedding") if getattr(self, f) is not None]
        if len(payloads) > 1:
            raise ValueError(f"payload_conflict: exactly one of image/image_uri/embedding, got "
                             f"{', '.join(payloads)}")
        if not payloads and self.label is None and self.loss is None:
            raise ValueError("payload_conflict: one of image/image_uri/embedding is required "
                             "(or label/loss for a late label)")
        return self

    @property
    def kind(self) -> Literal["inference", "label"]:
        """``label`` for a late label/loss without payload, else ``inference``."""
        has_payload = self.image is not None or self.image_uri is not None
        return "inference" if has_payload or self.embedding is not None else "label"

    def image_bytes(self) -> bytes | None:
        return pybase64.b64decode(self.image) if self.image is not None else None


def _reason_for(err: ValidationError) -> tuple[RejectReason, str]:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "event"
    message = f"{where}: {first['msg']}"
    if "payload_conflict" in first["msg"]:
        return RejectReason.payload_conflict, first["msg"].split("payload_conflict: ", 1)[-1]
    if first["type"] == "missing":
        return RejectReason.missing_field, f"{where} is required"
    return RejectReason.invalid_field, message


def parse_event(raw: bytes, *, max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> Event:
    """Validate raw Kafka value bytes; raise :class:`EventRejected` with the reason."""
    if raw is None:
        raise EventRejected(RejectReason.not_an_object, "empty message (tombstone)")
    if len(raw) > max_bytes:
        raise EventRejected(RejectReason.oversized_event, f"{len(raw)} bytes > {max_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EventRejected(RejectReason.invalid_utf8, str(exc)) from None
    try:
        data = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or an integer past Python's 4300 digits
        raise EventRejected(RejectReason.malformed_json, str(exc)) from None
    except RecursionError:  # [[[[… nested past the interpreter's recursion limit
        raise EventRejected(RejectReason.malformed_json, "nested too deeply") from None
    if not isinstance(data, dict):
        raise EventRejected(RejectReason.not_an_object, f"JSON {type(data).__name__}, not object")
    try:
        return Event.model_validate(data)
    except ValidationError as exc:
        raise EventRejected(*_reason_for(exc)) from None


class DeadLetter(BaseModel):
    """What goes to ``driftline.events.dlq``: the original bytes, where they came from, why.

    A value or key too large for the dead-letter topic is kept as a prefix only
    (``value_truncated``, ``key_truncated``); ``value_bytes`` and ``value_sha256`` describe the
    whole original value, which ``topic``/``partition``/``offset`` locate while Kafka keeps it.
    Records written before those fields parse with them unset.
    """

    model_config = ConfigDict(frozen=True)

    reason: RejectReason
    detail: str
    topic: str
    partition: int
    offset: int
    key: str | None = None
    value_b64: str = Field(description="original message value, base64 (its first bytes only "
                                       "when value_truncated)")
    event_id: str | None = None
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    value_truncated: bool = Field(False, description="value_b64 holds a prefix of the value")
    value_bytes: int | None = Field(None, description="length of the whole original value")
    value_sha256: str | None = Field(None, description="sha256 of the whole original value, hex")
    key_truncated: bool = Field(False, description="key holds a prefix of the original key")

    @classmethod
    def from_rejection(
        cls, exc: EventRejected, *, topic: str, partition: int, offset: int,
        key: bytes | None, value: bytes | None, event_id: str | None = None,
        max_value_bytes: int | None = None, max_key_bytes: int | None = None,
    ) -> DeadLetter:
        """``max_value_bytes``, ``max_key_bytes``: keep at most this much of each (None: all)."""
        whole = value or b""
        kept = whole if max_value_bytes is None else whole[:max_value_bytes]
        key_kept = key if key is None or max_key_bytes is None else key[:max_key_bytes]
        return cls(
            reason=exc.reason, detail=exc.detail[:2000], topic=topic, partition=partition,
            offset=offset,
            key=key_kept.decode("utf-8", "replace") if key_kept is not None else None,
            value_b64=base64.b64encode(kept).decode(), event_id=event_id,
            value_truncated=len(kept) < len(whole), value_bytes=len(whole),
            value_sha256=hashlib.sha256(whole).hexdigest(),
            key_truncated=key_kept != key,
        )

    def original(self) -> bytes:
        """The original value; a truncated one cannot be had from here."""
        if self.value_truncated:
            raise ValueError(f"only the first bytes of the {self.value_bytes}-byte value were "
                             f"kept; read it at {self.topic}[{self.partition}]@{self.offset}")
        return base64.b64decode(self.value_b64)


def slice_id(template: str, values: dict[str, str]) -> str:
    """``station=s1|shift=night`` for template ``station+shift`` (stable, readable key)."""
    return "|".join(f"{dim}={values[dim]}" for dim in template.split("+"))


def parse_slice_id(sid: str) -> dict[str, str]:
    """Inverse of :func:`slice_id`."""
    return dict(part.split("=", 1) for part in sid.split("|"))


# The ``reason`` of an outbox ``clear`` the detect stage sends when a slice's detectors restart
# on a newly activated reference: the alarm ended with its statistics, not with the change.
CLEAR_REFERENCE_CHANGED = "reference_changed"


# One slice-update in this many carries its event's Kafka timestamp (ms, ASCII) in this header;
# the detect stage observes end-to-end latency on those (a histogram observation costs ~1 µs,
# applying an update ~20 µs: 1 in 16 is a fair sample at < 0.1 µs each).
SOURCE_TS_HEADER = "dl-src-ts"
LATENCY_SAMPLE_EVERY = 16


class SliceUpdate(BaseModel):
    """The compact record the embed stage sends per monitored slice (key = ``slice_id``)."""

    model_config = ConfigDict(frozen=True)

    slice_id: str
    template: str
    event_id: str
    ts: datetime
    source_partition: int
    source_offset: int
    station: str
    shift: str
    lot: str
    baseline: str = Field(description="reference baseline key the event is judged against")
    cluster: int | None = None
    distance: float | None = None
    ood: bool | None = None
    model_version: str | None = None
    prediction: Prediction | None = None
    label: str | None = None
    loss: float | None = None
    error: bool | None = None
    late_label: bool = Field(
        default=False,
        description="a label or loss that arrived after its event: it updates the error "
                    "detectors only (``cluster`` is the event's, counted when it was embedded)")
    reference_id: str | None = Field(
        default=None,
        description="the reference the event was judged against (its clusters, baseline and "
                    "OOD threshold); None in records written before the field")
