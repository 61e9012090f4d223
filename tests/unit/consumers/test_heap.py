"""release_free_heap: freed C heap between live objects goes back to the system."""

from __future__ import annotations

from pathlib import Path

import pytest

from driftline.consumers.heap import release_free_heap


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_freed_records_between_live_objects_leave_rss_once_trimmed() -> None:
    """As a restore does: 7.6 kB transient records interleaved with the small objects that
    stay (malloc'd: over pymalloc's 512 B). Freed, glibc keeps their pages; trimmed, they go."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc")
    n = 12_000  # 91 MB of records
    kept, records = [], []
    for _ in range(n):
        records.append(bytearray(7_600))
        kept.append(bytearray(600))
    for r in records:
        r[::512] = b"x" * len(r[::512])  # touched: resident
    del records, r
    freed = _rss()
    if not release_free_heap():
        pytest.skip("no malloc_trim in this C library")
    trimmed = _rss()
    # a trim returns the whole pages inside each freed chunk: 7,600 / 4,096 − 1 ≈ 0.86 of a
    # page on average over random alignments, 46 % of the records' bytes (42 MB here)
    assert freed - trimmed > 0.3 * n * 7_600, (freed, trimmed)
    assert len(kept) == n
