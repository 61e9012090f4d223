"""What every request handler shares: settings, the Redis client, the failure book, the tokens
and the lazily loaded reference. One :class:`ServiceContext` per app, on ``app.state``.

Redis keys: :mod:`driftline.service.keys`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from driftline.alerts.book import FailureBook
from driftline.alerts.evidence import ClusterCatalog
from driftline.config import ApiToken, Settings
from driftline.reference.artifact import ReferenceError
from driftline.reference.index import Reference, load_reference
from driftline.service.keys import BOOK_PREFIX
from driftline.service.recent import RecentIndex
from driftline.service.references_store import active_reference
from driftline.service.thumbnails import Thumbnails

log = logging.getLogger(__name__)
T = TypeVar("T")
# With Redis down the API serves the configured reference and asks again this often which one
# is activated (the stages wait for Redis at their start instead).
REFERENCE_RETRY_S = 60.0


@dataclass
class ServiceContext:
    """Shared, thread-safe state of one API process (handlers run in a thread pool)."""

    settings: Settings
    redis: Redis
    book: FailureBook
    tokens: list[ApiToken]
    _reference: Reference | None = None
    _reference_error: str | None = None
    _reference_loaded: bool = False
    _reference_path: Path | None = None
    _reference_retry_at: float | None = None  # Redis was down when it was chosen
    # what is built on the reference (the recent index, the clusters of reference samples,
    # the cluster catalogue), by name; emptied when the reference is chosen again
    _built: dict[str, Any] = field(default_factory=dict)
    _thumbnails: Thumbnails | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def build(cls, settings: Settings, client: Redis | None = None) -> ServiceContext:
        client = client if client is not None else Redis.from_url(
            settings.redis_url, socket_timeout=10.0, health_check_interval=30)
        tokens = settings.tokens()
        if not tokens:
            log.warning(
                "NO API TOKENS CONFIGURED (DRIFTLINE_API_TOKENS): the triage API answers reads "
                "without authentication and refuses every mutating call with 403; configure "
                "'name:role:token' entries to enable acknowledge/resolve/annotate/activate")
        return cls(settings=settings, redis=client, book=FailureBook(client, prefix=BOOK_PREFIX),
                   tokens=tokens)

    def reference(self) -> Reference | None:
        """The reference the stages run on, loaded once: the activated one if it is still
        usable, else the configured one (``DRIFTLINE_REFERENCE_DIR``), as the stages choose at
        their start; None if unset or unreadable (the reason is in :attr:`reference_problem`).
        Like every worker, the API follows an activation when it restarts. Chosen while Redis
        was down (the configured one), the choice is made again every ``REFERENCE_RETRY_S``
        until Redis answers."""
        if self._reference_loaded and not self._retry_due():
            return self._reference
        with self._lock:
            if not self._reference_loaded or self._retry_due():
                self._load_reference()
        return self._reference

    def _retry_due(self) -> bool:
        return self._reference_retry_at is not None and time.monotonic() >= (
            self._reference_retry_at)

    def _load_reference(self) -> None:
        """Choose and load the reference (under the lock); what was built on another one (the
        recent index, the clusters of reference samples) goes with it."""
        self._reference_retry_at = None
        try:
            path, loaded = active_reference(self.settings, self.redis)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            log.warning("Redis unreachable: the API reads the configured reference for now, not "
                        "an activated one", extra={"error": repr(exc)})
            path, loaded = self.settings.reference_dir, None
            self._reference_retry_at = time.monotonic() + REFERENCE_RETRY_S
        if self._reference_loaded and path == self._reference_path:
            return
        self._reference_path, self._reference, self._reference_error = path, loaded, None
        self._built.clear()
        if loaded is None and path is None:
            self._reference_error = "DRIFTLINE_REFERENCE_DIR is not set"
        elif loaded is None and path is not None:
            try:
                self._reference = load_reference(Path(path))
            except (ReferenceError, OSError, ValueError) as exc:
                self._reference_error = f"reference at {path} is unusable: {exc}"
                log.error("reference not loaded", extra={"error": str(exc)})
        self._reference_loaded = True

    def _on_reference(self, name: str, build: Callable[[Reference | None], T]) -> T:
        """``build(reference)``, made once per choice of reference, on the one chosen as of
        now: another request may have chosen again between this one's read and the lock."""
        self.reference()
        with self._lock:
            if name not in self._built:
                self._built[name] = build(self._reference)
            built: T = self._built[name]
            return built

    def recent(self) -> RecentIndex:
        """The recent-events index (in the reference's space once the reference is loaded)."""
        return self._on_reference("recent", lambda ref: RecentIndex(self.redis, ref))

    def reference_clusters(self) -> dict[str, int]:
        """Cluster of each reference sample by event id (empty without a reference)."""
        return self._on_reference("clusters", lambda ref: {} if ref is None else dict(
            zip(ref.event_ids, (int(c) for c in ref.clusters), strict=True)))

    def catalog(self) -> ClusterCatalog:
        """The reference's catalogue, as the book builds it from the reference it started with
        (empty without a reference, or with a manifest the book could not read either)."""
        return self._on_reference("catalog", _catalog)

    def thumbnails(self) -> Thumbnails:
        """Exemplar thumbnails, read from the events topic and cached in Redis."""
        with self._lock:
            if self._thumbnails is None:
                s = self.settings
                self._thumbnails = Thumbnails(
                    self.redis, s.kafka_bootstrap, s.events_topic,
                    ttl_s=s.retention_resolved_days * 86400, max_event_bytes=s.max_event_bytes,
                    image_roots=tuple(Path(r) for r in s.image_roots) or None)
            return self._thumbnails

    @property
    def reference_problem(self) -> str | None:
        return self._reference_error

    def close(self) -> None:
        self.redis.close()


def _catalog(ref: Reference | None) -> ClusterCatalog:
    if ref is not None:
        try:
            return ClusterCatalog.from_manifest(ref.manifest)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.error("reference catalogue unusable",
                      extra={"error": f"{type(exc).__name__}: {exc}"})
    return ClusterCatalog()
