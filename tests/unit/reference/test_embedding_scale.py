"""Precomputed embeddings are normalised alike by the reference build and the embed stage, so
that the same event lands where the reference put it, whatever its scale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from driftline.consumers.embed_stage import EmbedStage
from driftline.metrics import EmbedMetrics
from driftline.reference import build_reference
from driftline.reference.index import Reference
from tests.unit.consumers.test_embed_stage import Msg, Producer
from tests.unit.reference.synthetic import reference_events


def _stream(ref: Reference, events: list[bytes]) -> list[dict[str, object]]:
    producer = Producer()
    stage = EmbedStage(
        None, producer, events_topic="ev", updates_topic="up",  # type: ignore[arg-type]
        dlq_topic="dlq", embedder=None, reference=ref,  # type: ignore[arg-type]
        templates=["station"], metrics=EmbedMetrics(CollectorRegistry()))
    stage.process([Msg("ev", 0, n, b"k", v) for n, v in enumerate(events)])
    assert not [v for t, _, v in producer.sent if t == "dlq"]
    return [json.loads(v) for t, _, v in producer.sent if t == "up"]


def test_embeddings_whose_squares_overflow_float32_keep_their_direction(tmp_path: Path) -> None:
    """1e20 is a value the event schema allows; its square is not a float32. The stream
    normalised such an embedding in float64 and kept it; the build made it all zeros."""
    events, _ = reference_events()
    big = [e.model_copy(update={"embedding": [1e20 * v for v in e.embedding or []]})
           for e in events]
    ref = build_reference(big, None, tmp_path / "big", k=6, min_count=100)
    unit = build_reference(events, None, tmp_path / "unit", k=6, min_count=100)
    np.testing.assert_allclose(np.linalg.norm(ref.embeddings, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ref.embeddings, unit.embeddings, atol=1e-6)
    assert (ref.clusters == unit.clusters).all()
    updates = _stream(ref, [e.model_dump_json().encode() for e in big[:20]])
    # each is a reference sample: the stream finds it where the build put it
    assert [u["cluster"] for u in updates] == ref.clusters[:20].tolist()
    assert max(float(u["distance"]) for u in updates) < 1e-3  # type: ignore[arg-type]


def test_an_all_zero_embedding_is_kept_by_the_build_as_by_the_stream(tmp_path: Path) -> None:
    """It has no direction; both keep it as zeros (one decision, not two)."""
    events, _ = reference_events()
    zero = events[0].model_copy(update={"event_id": "zero",
                                        "embedding": [0.0] * len(events[0].embedding or [])})
    ref = build_reference([*events[1:], zero], None, tmp_path / "r", k=6, min_count=100)
    assert ref.event_ids[-1] == "zero" and not ref.manifest["source"]["skipped"]
    assert not ref.embeddings[-1].any()
    (update,) = _stream(ref, [zero.model_dump_json().encode()])
    assert update["distance"] == 0.0  # the reference's own zero sample
