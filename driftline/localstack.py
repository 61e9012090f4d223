"""The local stack from Python: real Kafka, Redis, Prometheus and Alertmanager on loopback.

A thin wrapper over the ``deploy/local`` scripts, shared by the integration-test fixtures and
``driftline demo``. The scripts pick free ports, keep every file in one state directory, and
honour ``DRIFTLINE_KAFKA_BOOTSTRAP``, ``DRIFTLINE_REDIS_URL``, ``DRIFTLINE_PROMETHEUS_URL`` and
``DRIFTLINE_ALERTMANAGER_URL`` by using those services instead of starting their own.

>>> with start_stack(("redis",)) as stack:  # doctest: +SKIP
...     print(stack.redis_url)
redis://127.0.0.1:41234/0
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import cast

import redis

SERVICES = ("kafka", "redis", "prometheus", "alertmanager")
_EXTERNAL_VARS = {
    "kafka": "DRIFTLINE_KAFKA_BOOTSTRAP",
    "redis": "DRIFTLINE_REDIS_URL",
    "prometheus": "DRIFTLINE_PROMETHEUS_URL",
    "alertmanager": "DRIFTLINE_ALERTMANAGER_URL",
}
# A cold start may apt-get install packages and resolve the broker from Maven Central.
START_TIMEOUT_S = 900.0
# Kafka's controlled shutdown plus a restart of the JVM; the scripts' own limits are shorter.
RESTART_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 120.0


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (for a process about to bind it, or
    an address where no service answers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StackError(RuntimeError):
    """A stack script failed; the message carries its output, including service log tails."""


def scripts_dir() -> Path:
    """The ``deploy/local`` directory of the source checkout this module was loaded from."""
    path = Path(__file__).resolve().parents[1] / "deploy" / "local"
    if not (path / "stack.sh").is_file():
        raise StackError(
            f"deploy/local scripts not found at {path}: the local stack needs a source "
            "checkout of driftline (an installed wheel does not ship them)"
        )
    return path


def _parse_env(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("DRIFTLINE_"):
            env[key] = value
    return env


def _run(args: list[str], env: Mapping[str, str], timeout: float) -> str:
    try:
        done = subprocess.run(  # noqa: S603 - our own scripts, an argument list, no shell
            args, env=dict(env), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise StackError(f"{' '.join(args)} timed out after {timeout:.0f}s") from exc
    if done.returncode != 0:
        raise StackError(
            f"{' '.join(args)} failed (exit {done.returncode}):\n{done.stderr.rstrip()}"
        )
    return done.stdout


class Stack:
    """A running local stack; build it with :func:`start_stack`, end it with :meth:`stop`."""

    def __init__(
        self,
        state_dir: Path,
        env: dict[str, str],
        services: tuple[str, ...],
        *,
        script_env: dict[str, str],
        keep_dir: bool,
    ) -> None:
        self.state_dir = state_dir
        #: What the scripts printed: addresses, versions and log files, by variable name.
        self.env = env
        self.services = services
        self._script_env = script_env
        self._keep_dir = keep_dir
        self._stopped = False

    def _value(self, key: str, service: str) -> str:
        if service not in self.services:
            raise StackError(f"{service} is not part of this stack ({', '.join(self.services)})")
        return self.env.get(key, "")

    @property
    def kafka_bootstrap(self) -> str:
        return self._value("DRIFTLINE_KAFKA_BOOTSTRAP", "kafka")

    @property
    def redis_url(self) -> str:
        return self._value("DRIFTLINE_REDIS_URL", "redis")

    @property
    def prometheus_url(self) -> str:
        return self._value("DRIFTLINE_PROMETHEUS_URL", "prometheus")

    @property
    def alertmanager_url(self) -> str:
        return self._value("DRIFTLINE_ALERTMANAGER_URL", "alertmanager")

    def version(self, service: str) -> str | None:
        """A service's version as its script found it; None for one we did not start."""
        return self._value(f"DRIFTLINE_{service.upper()}_VERSION", service) or None

    @property
    def kafka_version(self) -> str | None:
        """The broker's release, read from its jar; None for a broker we did not start."""
        return self.version("kafka")

    @property
    def redis_version(self) -> str | None:
        """The server's version; asked with INFO when the server is not ours."""
        version = self.version("redis")
        if version is None:
            client = redis.Redis.from_url(self.redis_url)
            try:
                info = cast("dict[str, object]", client.info("server"))
                version = str(info["redis_version"])
            finally:
                client.close()
            self.env["DRIFTLINE_REDIS_VERSION"] = version
        return version or None

    @property
    def prometheus_rules_dir(self) -> Path | None:
        """Rule files dropped here load on ``POST /-/reload`` (generated config only)."""
        value = self.env.get("DRIFTLINE_PROMETHEUS_RULES_DIR")
        return Path(value) if value else None

    def is_external(self, service: str) -> bool:
        """True when the service came from a ``DRIFTLINE_*`` variable, not from us."""
        return bool(self._script_env.get(_EXTERNAL_VARS[service]))

    def log_file(self, service: str) -> Path | None:
        value = self.env.get(f"DRIFTLINE_{service.upper()}_LOG")
        return Path(value) if value else None

    def _script(self, service: str, action: str, timeout: float) -> dict[str, str]:
        if self._stopped:
            raise StackError("the stack has been stopped")
        if service not in self.services:
            raise StackError(f"{service} is not part of this stack")
        if self.is_external(service):
            raise StackError(
                f"{service} was given by {_EXTERNAL_VARS[service]}; not ours to {action}"
            )
        script = str(scripts_dir() / f"{service}.sh")
        return _parse_env(_run([script, action, str(self.state_dir)], self._script_env, timeout))

    def stop_service(self, service: str, *, hard: bool = False) -> None:
        """Stop one service (SIGTERM, or SIGKILL with ``hard``); its port and data are kept."""
        self._script(service, "kill" if hard else "stop", RESTART_TIMEOUT_S)

    def start_service(self, service: str) -> None:
        """Start a stopped service again on the same port with the same data."""
        self.env.update(self._script(service, "start", RESTART_TIMEOUT_S))

    def restart(self, service: str, *, hard: bool = False) -> None:
        """Restart Kafka or Redis in place: same address, same data directory."""
        self.stop_service(service, hard=hard)
        self.start_service(service)

    def as_env(self) -> dict[str, str]:
        """The ``DRIFTLINE_*`` variables that point a driftline process at this stack."""
        return dict(self.env)

    def stop(self) -> None:
        """Stop every service this stack started; remove its directory if we made it."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        args = [str(scripts_dir() / "stack.sh"), "stop", str(self.state_dir)]
        try:
            _run([*args, "--keep"] if self._keep_dir else args, self._script_env, STOP_TIMEOUT_S)
        finally:
            if not self._keep_dir:
                shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> Stack:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_stack(
    services: Iterable[str] = SERVICES,
    workdir: Path | str | None = None,
    *,
    prometheus_config: Path | str | None = None,
    alertmanager_config: Path | str | None = None,
    timeout: float = START_TIMEOUT_S,
) -> Stack:
    """Start the named services and wait until each answers.

    ``workdir`` holds the services' config, data and logs and is kept at :meth:`Stack.stop`;
    without it a temporary directory is made and removed. The stack also stops when this
    process exits, and a watchdog stops it if this process is killed.
    """
    chosen = tuple(dict.fromkeys(services))
    unknown = sorted(set(chosen) - set(SERVICES))
    if unknown or not chosen:
        raise StackError(f"unknown services {unknown}; choose from {', '.join(SERVICES)}")
    env = dict(os.environ)
    if workdir is None:
        state_dir = Path(tempfile.mkdtemp(prefix="driftline-stack."))
        # The marker lets stack.sh (and its watchdog, if we are killed) remove the directory.
        (state_dir / ".driftline-stack").touch()
    else:
        state_dir = Path(workdir).resolve()
        state_dir.mkdir(parents=True, exist_ok=True)
    env["DRIFTLINE_STACK_DIR"] = str(state_dir)
    if prometheus_config is not None:
        env["DRIFTLINE_PROMETHEUS_CONFIG"] = str(Path(prometheus_config).resolve())
    if alertmanager_config is not None:
        env["DRIFTLINE_ALERTMANAGER_CONFIG"] = str(Path(alertmanager_config).resolve())
    env["DRIFTLINE_STACK_OWNER_PID"] = str(os.getpid())
    stack = Stack(state_dir, {}, chosen, script_env=env, keep_dir=workdir is not None)
    try:
        out = _run([str(scripts_dir() / "stack.sh"), "start", *chosen], env, timeout)
    except BaseException:
        # A timeout or an interrupt can leave services half started: stop what is there.
        with contextlib.suppress(StackError):
            stack.stop()
        raise
    stack.env.update(_parse_env(out))
    atexit.register(stack.stop)
    return stack
