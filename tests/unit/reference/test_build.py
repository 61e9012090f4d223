from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import betabinom, norm

from driftline.core.baselines import smoothed
from driftline.reference import ReferenceError, build_reference, load_reference
from driftline.reference.space import loo_distances
from tests.unit.reference.synthetic import DIM, centres, event, reference_events, sample


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    events, truth = reference_events()
    out = tmp_path_factory.mktemp("ref") / "ref"
    build_reference(events, None, out, k=6, min_count=100, alpha=0.5, source_name="synthetic")
    return out, truth


def _majority(clusters: np.ndarray, truth: np.ndarray, centre: int) -> int:
    return int(np.bincount(clusters[truth == centre]).argmax())


def test_clusters_recover_the_structure(built: tuple[Path, np.ndarray]) -> None:
    path, truth = built
    ref = load_reference(path)
    assert ref.k == 6 and ref.dim == DIM and ref.model_sha256 is None
    mapping = {c: _majority(ref.clusters, truth, c) for c in range(6)}
    assert sorted(mapping.values()) == list(range(6))
    purity = np.mean([mapping[t] == c for t, c in zip(truth, ref.clusters, strict=True)])
    assert purity > 0.98
    sizes = [c["size"] for c in ref.manifest["clusters"]["items"]]
    assert sizes == sorted(sizes, reverse=True)  # cluster 0 is the largest
    clusters, dist = ref.assign(ref.embeddings)
    np.testing.assert_array_equal(clusters, ref.clusters)
    assert dist.max() < 1e-3  # every reference sample is its own nearest sample


def test_baselines_fall_back_to_their_parent(built: tuple[Path, np.ndarray]) -> None:
    ref = load_reference(built[0])
    assert set(ref.baseline_keys) == {"global", "station=s1", "station=s1|shift=day",
                                      "station=s1|shift=night", "station=s2",
                                      "station=s2|shift=day"}
    assert ref.baseline_for("s1", "night").key == "station=s1|shift=night"
    assert ref.baseline_for("s2", "night").key == "station=s2"  # 50 < min_count
    assert ref.baseline_for("s3", "day").key == "global"  # the whole station is too small
    assert ref.baseline_for("elsewhere", "day").key == "global"
    items = ref.manifest["baselines"]["items"]
    assert items["station=s2|shift=day"]["parent"] == "station=s2"
    assert items["station=s2"]["n"] == 300 and items["global"]["n"] == 950


def test_smoothing_toward_the_parent(built: tuple[Path, np.ndarray]) -> None:
    items = load_reference(built[0]).manifest["baselines"]["items"]
    for key, b in items.items():
        p = np.array(b["p"])
        assert (p > 0).all() and p.sum() == pytest.approx(1.0)
        prior = np.full(6, 1 / 6) if b["parent"] is None else np.array(items[b["parent"]]["p"])
        np.testing.assert_allclose(p, smoothed(np.array(b["counts"]), prior, 0.5), err_msg=key)
        expected = (np.array(b["counts"]) + 0.5 * 6 * prior) / (b["n"] + 3.0)
        np.testing.assert_allclose(p, expected)


def test_loo_threshold_exceedance_matches_new_samples(built: tuple[Path, np.ndarray]) -> None:
    ref = load_reference(built[0])
    base = ref.baseline_for("s1", "day")
    item = ref.manifest["baselines"]["items"]["station=s1|shift=day"]
    # 400 leave-one-out distances cut at their 0.99 quantile (method "higher": the 397th of
    # 400) leave k = 3 beyond: the stated rate is exactly (k + 1) / (n + 1), nothing random
    n, k = item["n"], item["ood_exceed"]
    assert (n, k) == (400, 3) and base.ood_rate == (k + 1) / (n + 1)
    # Fresh samples from the cell's law exceed the threshold at the stated rate. Over reference
    # samples the true exceedance rate U of the cut is Beta(k + 1, n - k) (the coverage of an
    # order statistic, mean (k + 1) / (n + 1)) and m fresh samples count Binomial(m, U): the
    # count is BetaBinomial(m, k + 1, n - k), here mean 29.9, sd 15.8, and skewed, so the
    # acceptance region is its central quantiles at Φ(-3) a side, [2, 98] of 3000: a false
    # failure has probability 0.22 % (a normal 3-sd window on the same sd: 1.0 %, upper tail).
    # Other reference and fresh seeds: 20 of 20 pass; of 200, 199 (0.4 failures expected),
    # their counts of mean 28.7 and sd 15.4.
    m = 3000
    rng = np.random.default_rng(42)
    fresh = sample(rng, rng.choice(6, m, p=[0.3, 0.3, 0.1, 0.1, 0.1, 0.1]))
    _, dist = ref.assign(fresh)
    exceeded = int(np.count_nonzero(dist > base.ood_threshold))
    law = betabinom(m, k + 1, n - k)
    tail = norm.cdf(-3.0)
    assert law.ppf(tail) <= exceeded <= law.isf(tail), (exceeded, law.ppf(tail), law.isf(tail))
    far = rng.normal(size=(200, DIM))  # random directions: nowhere near the six centres
    assert np.mean(ref.assign(far)[1] > base.ood_threshold) > 0.95


def test_aggressors_and_lift(built: tuple[Path, np.ndarray]) -> None:
    path, truth = built
    ref = load_reference(path)
    err_cluster = _majority(ref.clusters, truth, 2)
    loss_cluster = _majority(ref.clusters, truth, 4)
    agg = {a["cluster"]: a["reasons"] for a in ref.manifest["performance"]["aggressors"]}
    assert set(agg) == {err_cluster, loss_cluster}
    assert "error_rate" in agg[err_cluster] and agg[loss_cluster] == ["loss"]
    assert ref.aggressors == sorted(agg)
    items = ref.manifest["clusters"]["items"]
    s2_cluster = _majority(ref.clusters, truth, 5)  # half of station s2 lives in centre 5
    top = items[s2_cluster]["lift"]
    assert {"field": "station", "value": "s2"}.items() <= top[0].items()
    assert top[0]["lift"] > 1.5 and top[0]["count"] >= 3
    for item in items:
        assert len(item["exemplars"]) == 5
        assert all(ref.clusters[ref.event_ids.index(e)] == item["id"] for e in item["exemplars"])


def test_tampered_array_is_refused(built: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(built[0], copy)
    data = bytearray((copy / "embeddings.npy").read_bytes())
    data[-3] ^= 0x01
    (copy / "embeddings.npy").write_bytes(bytes(data))
    with pytest.raises(ReferenceError, match=r"embeddings\.npy is corrupt or was modified"):
        load_reference(copy)
    (copy / "centroids.npy").unlink()
    with pytest.raises(ReferenceError, match="centroids.npy is missing"):
        load_reference(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ReferenceError, match="format version 99"):
        load_reference(copy)
    with pytest.raises(ReferenceError, match="no manifest.json"):
        load_reference(tmp_path)


def test_model_identity_is_checked(built: tuple[Path, np.ndarray]) -> None:
    with pytest.raises(ReferenceError, match="precomputed embeddings.*abcdef"):
        load_reference(built[0], expected_model_sha256="abcdef" * 10)


def test_wrong_dimension_is_refused(built: tuple[Path, np.ndarray]) -> None:
    ref = load_reference(built[0])
    with pytest.raises(ReferenceError, match=r"expects \[N, 16\]"):
        ref.assign(np.ones((2, 5)))
    with pytest.raises(ReferenceError, match="NaN"):
        ref.assign(np.full((1, DIM), np.nan))
    clusters, dist = ref.assign(np.empty((0, DIM)))
    assert clusters.shape == dist.shape == (0,)
    with pytest.raises(ReferenceError, match="precomputed"):
        ref.embedder_config(Path("model.onnx"))
    dist5, ids = ref.nearest(ref.embeddings[:2], 3)
    assert dist5.shape == (2, 3) and ids[0][0] == ref.event_ids[0]


def test_existing_directory_is_not_overwritten(built: tuple[Path, np.ndarray]) -> None:
    events, _ = reference_events()
    with pytest.raises(ReferenceError, match="not empty"):
        build_reference(events, None, built[0])


def test_late_labels_duplicates_and_bad_dimensions(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    embs = sample(rng, rng.integers(0, 6, 60))
    events = [event(i, e, "s1", "day", prediction={"label": "ok", "score": 0.8})
              for i, e in enumerate(embs)]
    late = event(0, embs[0], "s1", "day").model_copy(update={"embedding": None,
                                                             "label": "scratch"})
    events += [late, events[1], event(99, np.ones(DIM + 1), "s1", "day")]
    ref = build_reference(events, None, tmp_path / "r", k=3)
    skipped = ref.manifest["source"]["skipped"]
    assert skipped == {"duplicate_event_id": 1, "embedding_dim": 1}
    assert ref.manifest["performance"]["labelled"] == 1
    assert ref.manifest["performance"]["error_rate"] == 1.0
    assert ref.manifest["clusters"]["k_rule"] == "given"


def test_pca(tmp_path: Path) -> None:
    events, _ = reference_events()
    ref = build_reference(events, None, tmp_path / "p", pca_dim=5, min_count=100)
    assert ref.space_dim == 5 and ref.dim == DIM
    assert ref.manifest["embedding"]["pca"]["explained_variance"] > 0.7
    assert ref.k == 10  # round(sqrt(950 / 10))
    clusters, dist = ref.assign(np.array(events[0].embedding)[None])
    assert clusters[0] == ref.clusters[0] and dist[0] < 1e-3


def test_exclusion_window_leaves_out_neighbours_in_time() -> None:
    rng = np.random.default_rng(5)
    walk = np.cumsum(rng.normal(0, 0.05, (300, 8)), axis=0) + centres()[0, :8]
    x = (walk / np.linalg.norm(walk, axis=1, keepdims=True)).astype(np.float32)
    groups = np.array(["a"] * 150 + ["b"] * 150, dtype=object)
    times = np.r_[np.arange(150.0), np.arange(150.0)]
    plain = loo_distances(x, groups, times)
    windowed = loo_distances(x, groups, times, exclude_within_s=10)
    full = np.linalg.norm(x[:, None] - x[None], axis=2)
    banned = (groups[:, None] == groups[None]) & (np.abs(times[:, None] - times[None]) <= 10)
    np.fill_diagonal(full, np.inf)
    np.testing.assert_allclose(plain, full.min(axis=1), atol=1e-5)
    np.testing.assert_allclose(windowed, np.where(banned, np.inf, full).min(axis=1), atol=1e-5)
    assert (windowed >= plain - 1e-6).all() and np.median(windowed) > 2 * np.median(plain)
    with pytest.raises(ReferenceError, match="no neighbour outside"):
        loo_distances(x[:150], groups[:150], times[:150], exclude_within_s=1000)


def test_image_reference_records_the_model(tmp_path: Path) -> None:
    import base64
    import io

    from PIL import Image

    from driftline.consumers.embedder import Embedder, EmbedderConfig
    from tests.unit.consumers.tiny_onnx import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny.onnx")
    embedder = Embedder(EmbedderConfig(model_path=model, output_name="features.1"))
    rng = np.random.default_rng(0)
    events = []
    for i in range(40):
        tint = np.array([200, 40, 40]) if i % 2 else np.array([40, 40, 200])
        arr = np.clip(tint + rng.normal(0, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        payload = ({"image": base64.b64encode(buf.getvalue()).decode()} if i % 3 else
                   {"image_uri": _write(tmp_path / f"{i}.png", buf.getvalue())})
        events.append(event(i, np.zeros(1), "s1", "day").model_copy(
            update={"embedding": None, **payload}))
    events.append(events[0].model_copy(update={"event_id": "bad", "image": "AAAA",
                                               "image_uri": None}))
    ref = build_reference(events, embedder, tmp_path / "ref", k=2)
    assert ref.model_sha256 == embedder.model_sha256
    desc = ref.manifest["embedding"]["model"]
    assert desc["output_name"] == "features.1" and desc["pooling"] == "avg"
    assert ref.manifest["source"]["skipped"] == {"image_undecodable": 1}
    assert load_reference(ref.path, expected_model_sha256=embedder.model_sha256).k == 2
    again = Embedder(ref.embedder_config(model, batch_size=4))
    assert again.describe() == embedder.describe()
    with pytest.raises(ReferenceError, match=f"model sha256 {embedder.model_sha256[:12]}"):
        load_reference(ref.path, expected_model_sha256="0" * 64)
    # the two tints are the two clusters
    tints = np.array([i % 2 for i in range(40)])
    assert len({(t, c) for t, c in zip(tints, ref.clusters, strict=True)}) == 2
    with pytest.raises(ReferenceError, match="an ONNX model is needed"):
        build_reference(events, None, tmp_path / "again", k=2)
    mixed = [*events[:20], event(500, np.ones(DIM), "s1", "day")]
    with pytest.raises(ReferenceError, match="one embedding space"):
        build_reference(mixed, embedder, tmp_path / "mixed", k=2)


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return path.as_uri()


def test_baselines_carry_the_bounds_their_detectors_judge_against(
    built: tuple[Path, np.ndarray]
) -> None:
    from driftline.core.baselines import DEFAULT_CONFIDENCE, mix_bounds, tail_rate_bound

    section = load_reference(built[0]).manifest["baselines"]
    assert section["bound_confidence"] == DEFAULT_CONFIDENCE
    for key, b in section["items"].items():
        p, lower, upper = (np.array(b[f]) for f in ("p", "p_lower", "p_upper"))
        assert (lower <= p).all() and (p <= upper).all(), key
        prior = np.full(6, 1 / 6) if b["parent"] is None else \
            np.array(section["items"][b["parent"]]["p"])
        np.testing.assert_allclose(np.stack([lower, upper]),
                                   mix_bounds(np.array(b["counts"]), prior, 0.5))
        assert b["ood_rate"] == (b["ood_exceed"] + 1) / (b["n"] + 1)  # stated: evidence
        assert b["ood_rate_bound"] == tail_rate_bound(b["n"], b["ood_exceed"]) > b["ood_rate"]


def test_detect_stage_reads_the_bounds_and_computes_them_for_older_references(
    built: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    import shutil

    from driftline.reference.artifact import content_id
    from driftline.runner import ReferenceBaselines

    new = ReferenceBaselines(load_reference(built[0]))
    old_dir = tmp_path / "old"  # as built before the bounds: the same, without their fields
    shutil.copytree(built[0], old_dir)
    doc = json.loads((old_dir / "manifest.json").read_text())
    del doc["baselines"]["bound_confidence"]
    for b in doc["baselines"]["items"].values():
        for field in ("p_lower", "p_upper", "ood_rate_bound"):
            del b[field]
    doc["reference_id"] = content_id(doc)
    (old_dir / "manifest.json").write_text(json.dumps(doc, indent=2))
    old = ReferenceBaselines(load_reference(old_dir))
    for key in doc["baselines"]["items"]:
        a, b = new.detector_baseline(key), old.detector_baseline(key)
        np.testing.assert_allclose(b.bounds, a.bounds, err_msg=key)
        assert b.ood_bound == pytest.approx(a.ood_bound) and b.ood_rate == a.ood_rate
        assert new.cluster_mix(key) is a.p and new.ood_rate(key) == a.ood_rate
    # one that lacks even the counts is judged against its stated rates, not refused
    for b in doc["baselines"]["items"].values():
        del b["counts"], b["ood_exceed"]
    doc["reference_id"] = content_id(doc)
    (old_dir / "manifest.json").write_text(json.dumps(doc, indent=2))
    bare = ReferenceBaselines(load_reference(old_dir)).detector_baseline("global")
    np.testing.assert_array_equal(bare.bounds, np.stack([bare.p, bare.p]))
    assert bare.ood_bound == bare.ood_rate
