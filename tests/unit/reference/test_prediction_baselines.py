"""The reference records prediction baselines when its events carry predictions: a bounded
label mix and a low-confidence cut per baseline, with fallback; older references still load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from driftline.core.error_rates import P0_QUANTILE
from driftline.reference import build_reference, load_reference
from driftline.reference.artifact import content_id
from driftline.reference.cli import summary
from driftline.runner import ReferenceBaselines, expected_errors
from driftline.schema import Event
from tests.unit.reference.synthetic import event, reference_events, sample

# (station, shift, events): s1 day and night have their own baselines, s2 falls back to global
CELLS = [("s1", "day", 500), ("s1", "night", 300), ("s2", "day", 150)]


def predicted_events(seed: int = 4) -> list[Event]:
    """Labels ok (≈75 %), scrap, dent (rare) and, at s1 night only, more scrap; scores high for
    ok, lower for the others."""
    rng = np.random.default_rng(seed)
    out: list[Event] = []
    for station, shift, count in CELLS:
        which = rng.choice(6, size=count)
        p = [0.6, 0.37, 0.03] if shift == "night" else [0.8, 0.18, 0.02]
        for emb in sample(rng, which):
            label = str(rng.choice(["ok", "scrap", "dent"], p=p))
            score = rng.beta(30, 1.5) if label == "ok" else rng.uniform(0.5, 0.95)
            out.append(event(len(out), emb, station, shift,
                             prediction={"label": label, "score": float(score)}))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ref"
    build_reference(predicted_events(), None, out, k=6, min_count=250, alpha=0.5,
                    max_labels=2, confidence_quantile=0.05)
    return out


def test_the_reference_records_a_bounded_label_mix_and_a_low_confidence_cut(built: Path) -> None:
    events = predicted_events()
    section = load_reference(built).manifest["predictions"]
    assert section["labels"] == ["ok", "scrap"] and section["max_labels"] == 2  # dent: other
    assert section["low_confidence_quantile"] == 0.05 and section["events"] == len(events)
    items = section["items"]
    assert set(items) == {"global", "station=s1", "station=s1|shift=day",
                          "station=s1|shift=night"}
    for key, cell in (("station=s1|shift=night", ("s1", "night")), ("global", None)):
        mine = [e for e in events if cell is None or (e.station, e.shift) == cell]
        assert items[key]["n"] == len(mine)
        assert items[key]["counts"] == [
            sum(e.prediction.label == lb for e in mine if e.prediction) for lb in ("ok", "scrap")
        ] + [sum(e.prediction.label == "dent" for e in mine if e.prediction)]
        scores = np.array([e.prediction.score for e in mine if e.prediction])
        cut = items[key]["low_confidence_cut"]
        assert cut == float(np.quantile(scores, 0.05, method="higher"))
        below = int((scores < cut).sum())
        assert items[key]["low_confidence_rate"] == (below + 1) / (len(scores) + 1)
        p = np.array(items[key]["p"])
        assert p.size == 3 and (p > 0).all() and p.sum() == pytest.approx(1.0)
    # night predicts more scrap than the station: its own mix, smoothed toward the station's
    assert items["station=s1|shift=night"]["p"][1] > items["station=s1"]["p"][1]
    assert items["station=s1|shift=night"]["parent"] == "station=s1"


def test_events_use_their_own_prediction_baseline_or_an_ancestors(built: Path) -> None:
    ref = load_reference(built)
    night = ref.prediction_for("station=s1|shift=night")
    assert night is not None and night.key == "station=s1|shift=night"
    assert ref.prediction_for(ref.baseline_for("s2", "day").key).key == "global"
    assert night.category("ok") == 0 and night.category("dent") == 2
    assert night.category("never-seen") == 2  # other
    adapter = ReferenceBaselines(ref)
    assert adapter.prediction("global") is ref.prediction_for("global") or (
        adapter.prediction("global").key == "global")
    assert adapter.detectors == ("cluster_mix", "ood_rate", "prediction_mix", "confidence")
    text = summary(ref.manifest)
    assert "predictions: 950 events, labels ok, scrap, (other)" in text
    assert "station=s1|shift=night" in text.split("predictions:")[1]


def test_a_reference_without_prediction_baselines_still_loads_and_runs_none(
    built: Path, tmp_path: Path
) -> None:
    old = tmp_path / "old"
    old.mkdir()
    for f in built.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    doc = json.loads((old / "manifest.json").read_text())
    del doc["predictions"]  # as written before prediction baselines existed
    doc["reference_id"] = content_id(doc)
    (old / "manifest.json").write_text(json.dumps(doc))
    ref = load_reference(old)
    assert ref.prediction_for("global") is None
    assert ReferenceBaselines(ref).prediction("station=s1") is None
    assert ReferenceBaselines(ref).detectors == ("cluster_mix", "ood_rate")
    assert "predictions: none" in summary(ref.manifest)


def test_events_without_predictions_make_no_prediction_section(tmp_path: Path) -> None:
    events = [e.model_copy(update={"prediction": None}) for e in predicted_events()]
    ref = build_reference(events, None, tmp_path / "r", k=6, min_count=250)
    assert ref.manifest["predictions"] is None and ref.prediction_for("global") is None


def test_every_labelled_cluster_has_a_positive_error_reference(tmp_path: Path) -> None:
    """The build records a shrunk error rate and the detector's reference rate per cluster,
    never 0; a reference built before they were recorded gets the same from its counts."""
    events, _ = reference_events()
    ref = build_reference(events, None, tmp_path / "r", k=6, min_count=100)
    rows = [c["performance"] for c in ref.manifest["clusters"]["items"]]
    assert all(0 < r["expected_error"] < r["error_p0"] < 1 for r in rows)
    prior = ref.manifest["performance"]["error_prior"]
    assert prior["p0_quantile"] == P0_QUANTILE and prior["strength"] >= 2 / prior["rate"]
    new = expected_errors(ref.manifest)
    assert new == {r["cluster"]: r["error_p0"] for r in rows}
    assert ReferenceBaselines(ref).expected_error(5) == rows[5]["error_p0"]
    legacy = json.loads(json.dumps(ref.manifest))
    for c in legacy["clusters"]["items"]:
        del c["performance"]["expected_error"], c["performance"]["error_p0"]
    assert expected_errors(legacy) == pytest.approx(new)
    assert ReferenceBaselines(ref).detectors[-1] == "error_rate"


def _rewritten(built: Path, tmp_path: Path, edit: Any) -> Path:
    """A copy of ``built`` whose manifest ``edit`` changed in place (a new content id)."""
    out = tmp_path / "edited"
    out.mkdir(parents=True)
    for f in built.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    doc = json.loads((out / "manifest.json").read_text())
    edit(doc)
    doc["reference_id"] = content_id(doc)
    (out / "manifest.json").write_text(json.dumps(doc))
    return out


def test_prediction_baselines_carry_the_bounds_their_detectors_judge_against(
    built: Path
) -> None:
    from driftline.core.baselines import DEFAULT_CONFIDENCE, tail_rate_bound
    from driftline.core.predictions import prediction_bounds

    ref = load_reference(built)
    section = ref.manifest["predictions"]
    assert section["bound_confidence"] == DEFAULT_CONFIDENCE
    items = section["items"]
    for key, b in items.items():
        p = np.array(b["p"])
        prior = np.full(3, 1 / 3) if b["parent"] is None else np.array(items[b["parent"]]["p"])
        lower, upper, rate = prediction_bounds(np.array(b["counts"]), prior, 0.5, p,
                                               b["low_confidence_count"])
        assert b["p_lower"] == lower.tolist() and b["p_upper"] == upper.tolist(), key
        assert (lower < p).all() and (p < upper).all(), key
        assert b["low_confidence_rate_bound"] == rate == tail_rate_bound(
            b["n"], b["low_confidence_count"]) > b["low_confidence_rate"], key
        view = ref.prediction_for(key)
        assert view is not None
        np.testing.assert_array_equal(view.bounds, np.stack([lower, upper]))
        assert view.low_confidence_bound == rate
    # the detect stage reads them once per baseline: one bounds array per view, by identity
    adapter = ReferenceBaselines(ref)
    night = adapter.prediction("station=s1|shift=night")
    assert night is not None and night.bounds is adapter.prediction(
        "station=s1|shift=night").bounds  # type: ignore[union-attr]


def test_older_references_get_prediction_bounds_from_their_counts(
    built: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fields = ("p_lower", "p_upper", "low_confidence_rate_bound")

    def before_bounds(doc: dict[str, Any]) -> None:
        del doc["predictions"]["bound_confidence"]
        for b in doc["predictions"]["items"].values():
            for field in fields:
                del b[field]

    new = ReferenceBaselines(load_reference(built))
    old = ReferenceBaselines(load_reference(_rewritten(built, tmp_path, before_bounds)))
    for key in load_reference(built).manifest["baselines"]["items"]:
        a, b = new.prediction(key), old.prediction(key)
        assert a is not None and b is not None
        np.testing.assert_allclose(b.bounds, a.bounds, err_msg=key)
        assert b.low_confidence_bound == pytest.approx(a.low_confidence_bound)
        assert b.low_confidence_rate == a.low_confidence_rate  # stated: unchanged

    def without_counts(doc: dict[str, Any]) -> None:
        before_bounds(doc)
        for b in doc["predictions"]["items"].values():
            del b["counts"], b["low_confidence_count"]

    bare = ReferenceBaselines(load_reference(_rewritten(
        built, tmp_path / "bare", without_counts))).prediction("global")
    assert bare is not None  # judged against its stated rates, not refused, with a warning
    np.testing.assert_array_equal(bare.bounds, np.stack([bare.p, bare.p]))
    assert bare.low_confidence_bound == bare.low_confidence_rate
    assert "taken as exact" in caplog.text
