"""Shared fixtures: the real local stack (deploy/local) for integration tests.

The stack starts once per session, the first time a test asks for it, and stops at the end.
Set DRIFTLINE_KAFKA_BOOTSTRAP, DRIFTLINE_REDIS_URL, DRIFTLINE_PROMETHEUS_URL or
DRIFTLINE_ALERTMANAGER_URL to test against services that are already running.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from kafka import KafkaConsumer

from driftline.localstack import Stack, start_stack

_STACK_LINES = pytest.StashKey[list[str]]()


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
