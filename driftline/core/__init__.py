"""Pure math: numpy and scipy only — clusters, baselines, detectors, calibration."""
