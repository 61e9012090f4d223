"""Event schema: valid events parse, malformed ones are rejected with a reason."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from driftline.schema import (
    DeadLetter,
    Event,
    EventRejected,
    RejectReason,
    SliceUpdate,
    parse_event,
    parse_slice_id,
    slice_id,
)

GOOD: dict[str, Any] = {
    "event_id": "e-1",
    "ts": "2026-11-23T08:00:00+01:00",
    "station": "press-3",
    "shift": "night",
    "lot": "L-0042",
    "model_version": "v7",
    "prediction": {"label": "ok", "score": 0.93},
    "embedding": [0.1, -0.2, 0.3],
}


def raw(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def rejected(data: bytes, **kw: Any) -> EventRejected:
    with pytest.raises(EventRejected) as info:
        parse_event(data, **kw)
    return info.value


def test_good_event_parses_to_utc() -> None:
    event = parse_event(raw(GOOD))
    assert event.ts.isoformat() == "2026-11-23T07:00:00+00:00"
    assert event.kind == "inference"
    assert event.prediction is not None and event.prediction.label == "ok"


def test_image_payload_round_trips() -> None:
    png = b"\x89PNG\r\n\x1a\nfake"
    doc = {**GOOD, "embedding": None, "image": base64.b64encode(png).decode()}
    del doc["embedding"]
    assert parse_event(raw(doc)).image_bytes() == png


def test_integer_embedding_values_are_numbers() -> None:
    assert parse_event(raw({**GOOD, "embedding": [1, 0, -2]})).embedding == [1.0, 0.0, -2.0]


def test_surrounding_whitespace_is_dropped_not_the_event() -> None:
    """A trailing newline read from a file would have cost the event its drift signal too."""
    event = parse_event(raw({**GOOD, "label": "scratch\n", "model_version": " v1\t",
                             "prediction": {"label": "ok\r\n", "score": 0.9}}))
    assert (event.label, event.model_version) == ("scratch", "v1")
    assert event.prediction is not None and event.prediction.label == "ok"
    assert rejected(raw({**GOOD, "label": " \n"})).reason is RejectReason.invalid_field


def test_late_label_without_payload_is_a_label_event() -> None:
    doc = {k: v for k, v in GOOD.items() if k not in ("embedding", "prediction")}
    event = parse_event(raw({**doc, "label": "scratch"}))
    assert event.kind == "label"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{not json", RejectReason.malformed_json),
        (b"\xff\xfe", RejectReason.invalid_utf8),
        (b"[1, 2]", RejectReason.not_an_object),
        (raw({k: v for k, v in GOOD.items() if k != "lot"}), RejectReason.missing_field),
        (raw({**GOOD, "station": ""}), RejectReason.invalid_field),
        (raw({**GOOD, "station": "a|b"}), RejectReason.invalid_field),
        (raw({**GOOD, "ts": "2026-11-23 08:00"}), RejectReason.invalid_field),
        (raw({**GOOD, "ts": "2026-11-23T08:00:00"}), RejectReason.invalid_field),
        (raw({**GOOD, "ts": 1_700_000_000}), RejectReason.invalid_field),
        (raw({**GOOD, "image": "aGVsbG8="}), RejectReason.payload_conflict),
        (raw({**GOOD, "embedding": None}), RejectReason.payload_conflict),
        (raw({**GOOD, "embedding": []}), RejectReason.invalid_field),
        (raw({**GOOD, "embedding": ["x"]}), RejectReason.invalid_field),
        (raw({**GOOD, "embedding": None, "image": "###"}), RejectReason.invalid_field),
        # padding after a complete group, missing padding, whitespace: not strict base64 (the
        # stdlib's validate=True let the first through; pybase64 does not)
        (raw({**GOOD, "embedding": None, "image": "QUJD="}), RejectReason.invalid_field),
        (raw({**GOOD, "embedding": None, "image": "QUI"}), RejectReason.invalid_field),
        (raw({**GOOD, "embedding": None, "image": "QU JD"}), RejectReason.invalid_field),
        (raw({**GOOD, "image_uri": "http://x/y.jpg", "embedding": None}),
         RejectReason.invalid_field),
        (raw({**GOOD, "image_uri": "file:///tmp/a%00b.jpg", "embedding": None}),
         RejectReason.invalid_field),
        (raw({**GOOD, "image_uri": "file:///tmp/a\x00b.jpg", "embedding": None}),
         RejectReason.invalid_field),
        (raw({**GOOD, "image_uri": "file:///tmp/a%1bb.jpg", "embedding": None}),
         RejectReason.invalid_field),
        (raw({**GOOD, "prediction": {"label": "ok", "score": 1.5}}), RejectReason.invalid_field),
        # numbers only: pydantic's lax mode took "0.5" and true as floats
        (raw({**GOOD, "embedding": ["0.5", "1"]}), RejectReason.invalid_field),
        (raw({**GOOD, "embedding": [True, False]}), RejectReason.invalid_field),
        # control characters: these end up in Redis keys, logs and the UI
        (raw({**GOOD, "event_id": "a\nb"}), RejectReason.invalid_field),
        (raw({**GOOD, "event_id": "a\x00b"}), RejectReason.invalid_field),
        (raw({**GOOD, "label": "scratch\x1b[31m"}), RejectReason.invalid_field),
        (raw({**GOOD, "prediction": {"label": "o\rk", "score": 0.5}}), RejectReason.invalid_field),
        (raw({**GOOD, "model_version": "v7\x7f"}), RejectReason.invalid_field),
        (b'{"event_id":"e","ts":"2026-11-23T08:00:00Z","station":"s","shift":"d","lot":"l",'
         b'"embedding":[1.0],"loss":NaN}', RejectReason.invalid_field),
    ],
)
def test_malformed_events_are_rejected_with_reason(data: bytes, reason: RejectReason) -> None:
    assert rejected(data).reason == reason


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        # past Python's int digit limit (ValueError, not a JSONDecodeError)
        (b'{"x": ' + b"1" * 5000 + b"}", RejectReason.malformed_json),
        (raw({**GOOD, "loss": 0}).replace(b'"loss": 0', b'"loss": ' + b"9" * 5000),
         RejectReason.malformed_json),
        # past the recursion limit
        (b'{"x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", RejectReason.malformed_json),
        # valid where written, past datetime's range in UTC (OverflowError)
        (raw({**GOOD, "ts": "9999-12-31T23:30:00-01:00"}), RejectReason.invalid_field),
        (raw({**GOOD, "ts": "0001-01-01T00:30:00+01:00"}), RejectReason.invalid_field),
        # in range, but not a plausible event time
        (raw({**GOOD, "ts": "1969-12-31T23:59:59Z"}), RejectReason.invalid_field),
        (raw({**GOOD, "ts": "9001-01-01T00:00:00Z"}), RejectReason.invalid_field),
    ],
    ids=["long-int", "long-int-loss", "deep-nesting", "ts-9999", "ts-0001", "ts-1969",
         "ts-9001"],
)
def test_inputs_that_break_the_parser_are_rejected_with_reason(data: bytes,
                                                               reason: RejectReason) -> None:
    err = rejected(data)
    assert err.reason == reason
    assert err.detail


def test_event_times_at_the_bounds_are_accepted() -> None:
    for ts in ("1970-01-01T00:00:00Z", "1970-01-01T00:30:00-01:00", "9000-12-31T23:59:59Z"):
        assert parse_event(raw({**GOOD, "ts": ts})).ts.tzinfo is not None


def test_lower_case_t_and_z_are_rfc_3339_too() -> None:
    """RFC 3339 §5.6 allows ``t`` and ``z``; fromisoformat alone refused them."""
    lower = parse_event(raw({**GOOD, "ts": "2026-11-23t07:00:00z"}))
    assert lower.ts == parse_event(raw(GOOD)).ts


def test_oversized_event_is_rejected_before_parsing() -> None:
    err = rejected(raw(GOOD), max_bytes=16)
    assert err.reason == RejectReason.oversized_event
    assert "> 16" in err.detail


def test_dead_letter_keeps_the_original_bytes() -> None:
    data = b"{broken"
    err = rejected(data)
    dl = DeadLetter.from_rejection(err, topic="driftline.events", partition=2, offset=17,
                                   key=b"press-3", value=data)
    back = DeadLetter.model_validate_json(dl.model_dump_json())
    assert back.original() == data
    assert (back.reason, back.partition, back.offset, back.key) == (
        RejectReason.malformed_json, 2, 17, "press-3")


def test_dead_letter_keeps_a_prefix_of_what_is_too_large_and_says_so() -> None:
    value = b'{"image": "' + b"A" * 100_000 + b'"}'
    key = b"press-3" * 10
    err = EventRejected(RejectReason.image_undecodable, "not an image")
    dl = DeadLetter.from_rejection(err, topic="driftline.events", partition=2, offset=17,
                                   key=key, value=value, max_value_bytes=1000, max_key_bytes=7)
    back = DeadLetter.model_validate_json(dl.model_dump_json())
    assert back.value_truncated and back.key_truncated
    assert base64.b64decode(back.value_b64) == value[:1000]
    assert back.key == "press-3"
    assert (back.value_bytes, back.value_sha256) == (len(value), hashlib.sha256(value).hexdigest())
    with pytest.raises(ValueError, match=r"driftline.events\[2\]@17"):
        back.original()
    whole = DeadLetter.from_rejection(err, topic="driftline.events", partition=2, offset=17,
                                      key=key, value=value, max_value_bytes=len(value),
                                      max_key_bytes=len(key))
    assert not whole.value_truncated and not whole.key_truncated
    assert whole.original() == value and whole.value_bytes == len(value)


def test_dead_letters_written_before_the_size_fields_still_parse() -> None:
    old = {"reason": "malformed_json", "detail": "line 1", "topic": "driftline.events",
           "partition": 0, "offset": 3, "key": None,
           "value_b64": base64.b64encode(b"{broken").decode(), "event_id": None,
           "time": "2026-11-23T08:00:00Z"}
    back = DeadLetter.model_validate_json(json.dumps(old))
    assert back.original() == b"{broken"
    assert (back.value_truncated, back.value_bytes, back.value_sha256) == (False, None, None)


def test_slice_ids_round_trip() -> None:
    values = {"station": "press-3", "shift": "night", "lot": "L1"}
    sid = slice_id("station+shift", values)
    assert sid == "station=press-3|shift=night"
    assert parse_slice_id(sid) == {"station": "press-3", "shift": "night"}


def test_slice_update_serialises() -> None:
    event = parse_event(raw(GOOD))
    upd = SliceUpdate(slice_id="station=press-3", template="station", event_id=event.event_id,
                      ts=event.ts, source_partition=0, source_offset=5, station=event.station,
                      shift=event.shift, lot=event.lot, baseline="station=press-3", cluster=3,
                      distance=0.2, ood=False)
    assert SliceUpdate.model_validate_json(upd.model_dump_json()) == upd


# Property-based: arbitrary bytes and arbitrary JSON never crash the parser; they either parse
# into a valid Event or are rejected with one of the known reasons.
json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    try:
        event = parse_event(data)
    except EventRejected as err:
        assert err.reason in set(RejectReason)
        assert err.detail
    else:
        assert isinstance(event, Event)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(GOOD)), json_values)
def test_corrupting_one_field_is_rejected_or_still_valid(field: str, value: Any) -> None:
    doc = {**GOOD, field: value}
    try:
        event = parse_event(raw(doc))
    except EventRejected as err:
        assert err.reason in {RejectReason.invalid_field, RejectReason.missing_field,
                              RejectReason.payload_conflict}
        assert field in err.detail or err.reason == RejectReason.payload_conflict
    else:
        # Accepted only when the value is still valid for the field.
        assert getattr(event, field) is not None or field in ("model_version", "prediction")


@settings(max_examples=200, deadline=None)
@given(st.sets(st.sampled_from(["event_id", "ts", "station", "shift", "lot"]), min_size=1))
def test_dropping_required_fields_names_one_of_them(dropped: set[str]) -> None:
    doc = {k: v for k, v in GOOD.items() if k not in dropped}
    err = rejected(raw(doc))
    assert err.reason == RejectReason.missing_field
    assert any(name in err.detail for name in dropped)
