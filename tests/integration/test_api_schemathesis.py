"""Property-based contract test: schemathesis against the app's own OpenAPI spec (in-process
ASGI, real Redis with a populated book). Every generated request — valid and invalid — must
get a documented status (never 5xx) and a body matching the documented schema."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from prometheus_client import CollectorRegistry

from driftline.service.app import create_app
from tests.integration.test_api import TOKENS, db_url, make_settings
from tests.unit.service.populate import build_references, populate

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")
GenerationMode = schemathesis.GenerationMode
pytestmark = pytest.mark.integration
DB = 10
EXAMPLES = 10  # per operation and mode: 23 operations keep the run under a minute


@pytest.fixture(scope="module")
def api_schema(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    url = db_url(redis_url, DB)
    r = redis.Redis.from_url(url)
    r.flushdb()
    refs: tuple[Path, Path] = build_references(tmp_path_factory.mktemp("refs"))
    populate(r, refs[0], n_events=600)
    r.close()
    app = create_app(CollectorRegistry(), None, make_settings(url, refs[0]))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def _instant(value: Any) -> datetime | None:
    try:
        t = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _ordered(case: Any) -> Any:
    """A schema-valid case with ``since`` after ``until`` gets them swapped: OpenAPI cannot
    state that one parameter must not exceed another, so such a case is valid by the schema
    and rightly a 422 (tests/unit/service/test_time_range.py checks that answer)."""
    q = case.query or {}
    lo, hi = _instant(q.get("since")), _instant(q.get("until"))
    if lo is not None and hi is not None and lo > hi:
        q["since"], q["until"] = q["until"], q["since"]
    return case


def _has_auth(case: Any) -> bool:
    return any(name.lower() == "authorization" for name in (case.headers or {}))


def _run(op: Any, mode: Any, failures: list[str]) -> None:
    strategy = op.as_strategy(generation_mode=mode)

    @given(case=strategy.map(_ordered) if mode is GenerationMode.POSITIVE else strategy)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        # A case's bearer token (schemathesis makes one up) becomes a valid one; a negative
        # case that leaves the token out (its violation: the security scheme unmet) is sent
        # without one and must be refused. Adding the token to it too made a request that
        # violated nothing else valid, and its 200 failed the test as "accepted" — in some
        # runs only, as the derandomized draws happened to fall (alone, it failed every time).
        auth = {"Authorization": f"Bearer {TOKENS['admin']}"} if _has_auth(case) else {}
        case.call_and_validate(headers=auth)

    try:
        check()
    except (KeyboardInterrupt, SystemExit):
        raise
    except Unsatisfiable:  # nothing to violate: an operation without parameters or body
        if mode is not GenerationMode.NEGATIVE:
            raise
    except BaseException as exc:  # noqa: B036 - report every failing operation, not the first
        failures.append(f"{op.label} [{mode.value}]: {exc}")


def test_api_conforms_to_its_openapi_spec(api_schema: Any) -> None:
    """Positive (schema-valid) and negative (schema-violating) requests for every operation:
    no 5xx, only documented statuses, bodies and content types as documented, and invalid
    input rejected with 4xx."""
    failures: list[str] = []
    ops = [result.ok() for result in api_schema.get_all_operations()]
    assert len(ops) >= 20
    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _run(op, mode, failures)
    assert not failures, "\n\n".join(failures)
