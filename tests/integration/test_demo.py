"""The factory demo in reduced size, as CI runs it: every injection found, rooted right, no
false incident (the README's main command runs the same code at a larger size)."""

from __future__ import annotations

import re
import uuid

import pytest

from driftline.demo.run import run_demo
from driftline.localstack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_small_demo_finds_each_injection_in_the_right_slice(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    base = re.sub(r"/\d+$", "", stack.redis_url.rstrip("/"))
    name = uuid.uuid4().hex[:6]
    monkeypatch.setenv("DRIFTLINE_KAFKA_BOOTSTRAP", stack.kafka_bootstrap)
    monkeypatch.setenv("DRIFTLINE_REDIS_URL", f"{base}/13")
    monkeypatch.setenv("DRIFTLINE_PROMETHEUS_URL", stack.prometheus_url)
    monkeypatch.setenv("DRIFTLINE_ALERTMANAGER_URL", stack.alertmanager_url)
    for topic in ("EVENTS", "SLICE_UPDATES", "ALERTS", "DLQ"):
        monkeypatch.setenv(f"DRIFTLINE_{topic}_TOPIC", f"demo{name}.{topic.lower()}")
    import redis

    redis.Redis.from_url(f"{base}/13").flushdb()
    status = run_demo("small")
    out = capsys.readouterr().out
    assert "false incidents: 0" in out, out
    assert "MISSED" not in out and "(WRONG)" not in out, out
    # on-call's view: every incident's exemplar thumbnail, served by the API from the topic
    assert len(re.findall(r"exemplar \S+: thumbnail \d+x\d+ JPEG", out)) >= 3, out
    # what changed: the book describes each shifted cluster from the alarm's reference
    assert "gained: " in out and "no description in the reference" not in out, out
    assert status == 0, out
    print(out)
