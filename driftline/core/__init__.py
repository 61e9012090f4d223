"""Pure math: numpy and scipy only — clusters, baselines, detectors, calibration.

Change detection, one concern per module:

* :mod:`~driftline.core.cusum` — the CUSUM-bank state every detector shares (onset, snapshot);
* :mod:`~driftline.core.mix` — cluster-mix and prediction-mix banks ("mass moved into / out of k");
* :mod:`~driftline.core.bernoulli` — OOD-rate, low-confidence and error-rate banks;
* :mod:`~driftline.core.slices` — all detectors of one slice behind one ``update``;
* :mod:`~driftline.core.counts` — mergeable observed-vs-expected counts since an onset;
* :mod:`~driftline.core.budget` — thresholds from an operator's false-alarm budget;
* :mod:`~driftline.core.simulate` — vectorised Monte Carlo of the banks (calibration, benchmarks);
* :mod:`~driftline.core.arl` — Brook–Evans ARLs of a single CUSUM (the optimal reference).
"""
