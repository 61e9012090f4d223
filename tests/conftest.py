"""Shared fixtures: the real local stack (deploy/local) for integration tests.

The stack starts once per session, the first time a test asks for it, and stops at the end.
Set DRIFTLINE_KAFKA_BOOTSTRAP, DRIFTLINE_REDIS_URL, DRIFTLINE_PROMETHEUS_URL or
DRIFTLINE_ALERTMANAGER_URL to test against services that are already running.

Every test also gets the logging configuration it started with back when it ends (see
:func:`pytest_runtest_protocol`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kafka import KafkaConsumer

from driftline.localstack import Stack, start_stack

_STACK_LINES = pytest.StashKey[list[str]]()


def _logger_state(logger: logging.Logger) -> tuple[Any, ...]:
    return (logger.level, logger.propagate, logger.disabled, logger.handlers[:],
            logger.filters[:])


def _set_logger_state(logger: logging.Logger, state: tuple[Any, ...]) -> None:
    level, logger.propagate, logger.disabled, logger.handlers[:], logger.filters[:] = state
    logger.setLevel(level)  # through setLevel: it clears the loggers' isEnabledFor caches


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    """Give back, after each test, the logging configuration it started with.

    Tests that run the CLI (``driftline config show``, ``reference show``…) or ``serve`` go
    through :func:`driftline.logs.configure_logging`, which sets the root logger to the
    service's level (INFO) with one handler on the ``sys.stderr`` of that moment (a
    CliRunner's, closed when the invoke returns) and sets the ``kafka``, ``httpx`` and
    ``httpcore`` loggers' levels.
    Left in place, every later test saw INFO lines it does not expect in ``caplog`` and
    "--- Logging error ---" tracebacks in its CliRunner output, so results depended on the
    order the files ran in. Loggers that existed before the test get their level, propagate
    and disabled flags, handlers and filters back; loggers first made during it go back to a
    new logger's defaults; so does ``logging.disable``.

    A hook around the whole protocol rather than an autouse fixture: fixtures set up and tear
    down inside pytest's per-phase log capture, whose handlers sit on the root logger then,
    and restoring a handler list taken in the setup phase would leave that phase's handler
    attached and take the teardown phase's away.
    """
    manager = logging.Logger.manager
    root = logging.getLogger()
    saved = {name: _logger_state(lg) for name, lg in manager.loggerDict.items()
             if isinstance(lg, logging.Logger)}
    saved_root, disabled = _logger_state(root), manager.disable
    try:
        return (yield)
    finally:
        for name, lg in list(manager.loggerDict.items()):
            if isinstance(lg, logging.Logger):
                _set_logger_state(lg, saved.get(name, (logging.NOTSET, True, False, [], [])))
        _set_logger_state(root, saved_root)
        logging.disable(disabled)


def _kafka_line(stack: Stack) -> str:
    if stack.kafka_version:
        return f"Kafka broker: Apache Kafka {stack.kafka_version} at {stack.kafka_bootstrap}"
    # kafka-python infers the broker's API level from its ApiVersions answer.
    consumer = KafkaConsumer(bootstrap_servers=stack.kafka_bootstrap)
    try:
        api = ".".join(map(str, consumer.config["api_version"]))
    finally:
        consumer.close()
    return f"Kafka broker: external at {stack.kafka_bootstrap} (speaks the API of Kafka {api})"


def _redis_line(stack: Stack) -> str:
    client = redis.Redis.from_url(stack.redis_url)
    try:
        assert client.ping()
    finally:
        client.close()
    return f"Redis {stack.redis_version} answered PING at {stack.redis_url}"


def _describe(stack: Stack, seconds: float) -> list[str]:
    prometheus = stack.version("prometheus") or "(external)"
    alertmanager = stack.version("alertmanager") or "(external)"
    return [
        _kafka_line(stack),
        _redis_line(stack),
        f"Prometheus {prometheus} ready at {stack.prometheus_url}",
        f"Alertmanager {alertmanager} ready at {stack.alertmanager_url}",
        f"local stack up in {seconds:.1f}s, files in {stack.state_dir}",
    ]


def _show(config: pytest.Config, lines: list[str]) -> None:
    """Write past output capture, so the lines appear even under -q."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capman = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capman is None:
        return
    with capman.global_and_fixture_disabled():
        reporter.ensure_newline()
        for line in lines:
            reporter.write_line(line)


@pytest.fixture(scope="session")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    started = time.monotonic()
    running = start_stack()
    try:
        lines = _describe(running, time.monotonic() - started)
        request.config.stash[_STACK_LINES] = lines
        _show(request.config, lines)
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(stack: Stack) -> str:
    return stack.kafka_bootstrap


@pytest.fixture(scope="session")
def redis_url(stack: Stack) -> str:
    return stack.redis_url


@pytest.fixture(scope="session")
def prometheus_url(stack: Stack) -> str:
    return stack.prometheus_url


@pytest.fixture(scope="session")
def alertmanager_url(stack: Stack) -> str:
    return stack.alertmanager_url


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = terminalreporter.config.stash.get(_STACK_LINES, None)
    if lines:
        terminalreporter.section("local stack")
        for line in lines:
            terminalreporter.write_line(line)
