"""Generate driftline's Grafana dashboards as code (grafanalib) into dashboards/*.json.

    python deploy/grafana/generate.py            # rewrite deploy/grafana/dashboards/
    python deploy/grafana/generate.py --check    # exit 1 if the committed JSON is stale

The JSON is committed so that Grafana (compose provisioning, or any Grafana that loads a
folder) needs no Python; tests/deploy checks that it equals this generator's output and that
every metric it queries exists. Queries prefer the recorded series of
deploy/prometheus/rules.yml, so a dashboard and an alert read the same numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import attr
from grafanalib._gen import DashboardEncoder  # the encoder grafanalib's own docs use
from grafanalib.core import (
    GRAPH_TOOLTIP_MODE_SHARED_CROSSHAIR,
    Annotations,
    Dashboard,
    DashboardLink,
    GridPos,
    Panel,
    RowPanel,
    Stat,
    Target,
    Template,
    Templating,
    Text,
    Time,
    TimeSeries,
)

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}  # provisioned in compose
SCHEMA_VERSION = 39  # every panel below is a current panel type; no legacy migration needed
TAGS = ["driftline"]
WIDTH = 24  # Grafana's grid


def target(expr: str, legend: str = "", *, instant: bool = False) -> Target:
    return Target(expr=expr, legendFormat=legend, refId="A", datasource=DATASOURCE,
                  instant=instant)


def series(title: str, *targets: Target, unit: str = "", description: str = "",
           link: dict[str, str] | None = None, **options: object) -> TimeSeries:
    """A time series panel on the Prometheus datasource; queries are lettered A, B, ..."""
    lettered = [attr.evolve(t, refId=chr(ord("A") + i)) for i, t in enumerate(targets)]
    extra = {"fieldConfig": {"defaults": {"links": [link]}}} if link else None
    return TimeSeries(title=title, targets=lettered, dataSource=DATASOURCE, unit=unit,
                      description=description or None, legendDisplayMode="table",
                      legendPlacement="right", legendCalcs=["lastNotNull", "max"],
                      tooltipMode="multi", extraJson=extra, maxDataPoints=None, **options)


def stat(title: str, expr: str, *, unit: str = "none", description: str = "",
         steps: list[dict[str, object]] | None = None, no_value: str = "0") -> Stat:
    """A single number: the latest value of one instant query."""
    return Stat(title=title, targets=[target(expr, instant=True)], dataSource=DATASOURCE,
                format=unit, description=description or None, reduceCalc="lastNotNull",
                graphMode="none", colorMode="background", noValue=no_value,
                thresholds=steps or [{"color": "green", "value": None}])


# The statistic/threshold gauges are published at checkpoints, after the update that crossed
# has restarted the detector: they read below 1 even while an alarm is open.
RATIO_RESTARTS = ("A detector alarms when its ratio reaches 1 and restarts from 0 in the same "
                  "update, so the exported ratio stays below 1: a climb towards 1 is a change "
                  "building up; open alarms are driftline_detect_open_alarms.")


def threshold_at_one() -> dict[str, object]:
    """Statistic/threshold panels: a dashed red line where the detector alarms."""
    return {"thresholds": [{"color": "green", "value": None}, {"color": "red", "value": 1}],
            "thresholdsStyleMode": "dashed"}


def red_above_zero() -> list[dict[str, object]]:
    return [{"color": "green", "value": None}, {"color": "red", "value": 1}]


def layout(rows: Iterable[tuple[str, int, list[Panel]]]) -> list[Panel]:
    """Place panels left to right in titled rows; a row's panels share its height and fill its
    width (when the grid does not divide evenly, some panels are one column wider)."""
    placed: list[Panel] = []
    y = 0
    for title, height, panels in rows:
        placed.append(RowPanel(title=title, gridPos=GridPos(h=1, w=WIDTH, x=0, y=y)))
        y += 1
        n = len(panels)
        for i, panel in enumerate(panels):
            x = WIDTH * i // n
            panel.gridPos = GridPos(h=height, w=WIDTH * (i + 1) // n - x, x=x, y=y)
            placed.append(panel)
        y += height
    return placed


def dashboard(uid: str, title: str, description: str, rows: Iterable[tuple[str, int, list[Panel]]],
              templates: list[Template] | None = None,
              annotations: list[dict[str, object]] | None = None) -> Dashboard:
    links = [DashboardLink(title="driftline", type="dashboards", tags=TAGS, asDropdown=True,
                           includeVars=False, keepTime=True)]
    return Dashboard(
        uid=uid, title=title, description=description, tags=TAGS, timezone="browser",
        time=Time("now-6h", "now"), refresh="30s", schemaVersion=SCHEMA_VERSION,
        graphTooltip=GRAPH_TOOLTIP_MODE_SHARED_CROSSHAIR, editable=False,
        links=links, panels=layout(rows),
        templating=Templating(list=templates or []),
        annotations=Annotations(list=annotations or []),
    ).auto_panel_ids()


def station_variable() -> Template:
    return Template(name="station", label="station", dataSource=DATASOURCE,
                    query="label_values(driftline_embed_station_events_total, station)",
                    refresh=2, sort=1)


# --- fleet overview ---------------------------------------------------------------------------
def fleet() -> Dashboard:
    # A station name is free text: percent-encoded, a '&', '#' or space in it cannot cut the
    # link short or add parameters (Grafana before 10 did not encode data-link values by
    # default). __url_time_range is already a query string, to be put in as it is.
    drill = ("/d/driftline-station?var-station=${__field.labels.station:percentencode}"
             "&${__url_time_range}")
    stats = [
        stat("Events / s", "driftline:embed_events:rate5m", unit="reqps",
             description="Records consumed by the embed stage (5 min rate), those "
                         "dead-lettered included."),
        stat("Stations sending", "count(driftline:embed_station_events:rate5m > 0)",
             description="Stations with at least one event in the last 5 minutes."),
        stat("Stations in alarm",
             "count(max by (station) (driftline_detect_open_alarms) > 0) or vector(0)",
             description="Stations with an open detector alarm on their station or station x "
                         "shift slices: from the detect checkpoint after the crossing until the "
                         "alarm clears or its incident is resolved.",
             steps=red_above_zero()),
        *(incidents_stat(severity, color) for severity, color in (
            ("critical", "red"), ("major", "orange"), ("warning", "yellow"))),
        stat("Live slices", "sum(driftline_detect_live_slices)",
             description="Slices held in memory by the detect workers."),
    ]
    drift = [
        series("Drift statistic / threshold per station and shift",
               target("driftline:detect_statistic_ratio:max", "{{station}} / {{shift}}"),
               description=RATIO_RESTARTS + " Largest ratio per station (shift=all) and "
                           "station x shift slice; click a series to drill down.",
               link={"title": "Drill down into ${__field.labels.station}", "url": drill},
               **threshold_at_one()),
        series("Open alarms per station",
               target("sum by (station) (driftline_detect_open_alarms) > 0", "{{station}}"),
               description="Detector alarms open on each station's station and station x "
                           "shift slices (one per slice and detector). Click a series to drill "
                           "down.",
               link={"title": "Drill down into ${__field.labels.station}", "url": drill},
               drawStyle="line", lineInterpolation="stepAfter"),
    ]
    traffic = [
        series("Events / s per station",
               target("driftline:embed_station_events:rate5m", "{{station}}"), unit="reqps"),
        series("OOD rate / reference rate per station",
               target('driftline_detect_ood_ratio{shift="all"}', "{{station}}"),
               description="Share of out-of-distribution events over the last hour of "
                           "event time, over the reference exceedance rate (1 = as in "
                           "reference)."),
    ]
    alarms = [
        series("Detector alarms (per hour)",
               target("sum by (template, detector) (increase(driftline_detect_alarms_total[1h]))",
                      "{{template}} / {{detector}}"),
               drawStyle="bars", fillOpacity=60),
        series("Incidents opened (per hour)",
               target("sum by (severity) (increase(driftline_incidents_total[1h]))",
                      "{{severity}}"),
               drawStyle="bars", fillOpacity=60),
    ]
    book = [
        series("Alert deliveries by target and outcome",
               target("sum by (target, outcome) (rate(driftline_alerts_pushes_total[5m]))",
                      "{{target}} {{outcome}}"), unit="ops",
               description="Deliveries of incident changes by the failure book. error: "
                           "failed, retried next round (late, not lost); rejected: the target "
                           "refused the payload (400, 413, 415, 422) and the change was "
                           "dropped for it."),
        # max, not sum: two book processes overlapping export the same book's counts
        series("Held incidents by severity",
               target("max by (severity) (driftline_incidents_held)", "{{severity}}"),
               description="Incidents the co-occurrence attribution opened (split off, new "
                           "root), not paged until it is stable behind them (at most "
                           "DRIFTLINE_INCIDENT_HOLD_MAX_S of event time). Not in the active "
                           "counts above.",
               drawStyle="line", lineInterpolation="stepAfter"),
    ]
    return dashboard(
        "driftline-fleet", "driftline / Fleet overview",
        "What changed, where and since when, across every station.",
        [("Now", 4, stats), ("Drift", 10, drift), ("Traffic", 8, traffic),
         ("Alarms and incidents", 8, alarms), ("Failure book", 8, book)],
        annotations=[incidents_annotation()],
    )


def incidents_stat(severity: str, color: str) -> Stat:
    """Active incidents of one severity: open (unacknowledged) and acknowledged alike."""
    return stat(f"Active {severity} incidents",
                f'sum(driftline:incidents_open:max{{severity="{severity}"}})',
                description="Open and acknowledged incidents in the failure book, until they "
                            "are resolved. The alerts page only for the unacknowledged ones: "
                            "GET /api/v1/incidents?status=open lists them.",
                steps=[{"color": "green", "value": None}, {"color": color, "value": 1}])


# --- station drill-down ------------------------------------------------------------------------
def incidents_annotation() -> dict[str, object]:
    """Incident openings (any station: the incident counters carry severity only)."""
    return {
        "name": "Incidents opened (fleet)",
        "datasource": DATASOURCE,
        "enable": True,
        "iconColor": "red",
        "expr": "sum by (severity) (increase(driftline_incidents_total[2m])) > 0",
        "step": "1m",
        "titleFormat": "incident opened",
        "textFormat": "severity {{severity}}",
        "tagKeys": "severity",
    }


def station() -> Dashboard:
    sel = 'station="$station"'
    summary = [
        stat("Events / s", f'sum(driftline:embed_station_events:rate5m{{{sel}}})',
             unit="reqps"),
        stat("Open alarms", f"sum(driftline_detect_open_alarms{{{sel}}})",
             description="Detector alarms open on this station's station and station x shift "
                         "slices (one per slice and detector), until they clear or their "
                         "incident is resolved.",
             steps=red_above_zero(), no_value="-"),
        stat("Worst statistic / threshold",
             f"max(driftline_detect_statistic_ratio{{{sel}}})",
             description=RATIO_RESTARTS,
             steps=[{"color": "green", "value": None}, {"color": "orange", "value": 0.7}],
             no_value="-"),
        stat("Event-time lag",
             f"driftline:embed_station_event_time_lag_seconds:max{{{sel}}}", unit="s",
             description="Wall clock minus the newest event's own timestamp. Replays, "
                         "backfills and camera clocks inflate it; silence is alerted on "
                         "arrival rates instead.", no_value="-"),
        Text(title="Incidents of this station",
             content="Onsets are in event time and live in the failure book: "
                     "`GET /api/v1/incidents?station=${station:percentencode}` on the "
                     "driftline API (what changed, since when, exemplars).",
             mode="markdown"),
    ]
    mix = [
        series("Cluster shares",
               target(f"driftline_detect_cluster_share_ratio{{{sel}}}", "cluster {{cluster}}"),
               unit="percentunit", fillOpacity=70, stacking={"mode": "normal", "group": "A"},
               description="Share of recent events per reference cluster: mass moving into "
                           "or out of a cluster is what the cluster-mix detectors see."),
    ]
    drift = [
        series("Statistic / threshold per shift and detector",
               target(f'driftline_detect_statistic_ratio{{{sel},shift=~"$shift"}}',
                      "{{shift}} / {{detector}}"),
               description=RATIO_RESTARTS + " The annotations mark open alarms.",
               **threshold_at_one()),
        series("OOD rate / reference rate per shift",
               target(f'driftline_detect_ood_ratio{{{sel},shift=~"$shift"}}', "{{shift}}")),
    ]
    shift = Template(name="shift", label="shift", dataSource=DATASOURCE,
                     query=f"label_values(driftline_detect_statistic_ratio{{{sel}}}, shift)",
                     refresh=2, sort=1, includeAll=True, multi=True, default="$__all",
                     allValue=".*")
    alarms = {  # a region from the alarm's first checkpoint to its clear or reset
        "name": "Alarm open",
        "datasource": DATASOURCE,
        "enable": True,
        "iconColor": "orange",
        "expr": f"max by (shift, detector) (driftline_detect_open_alarms{{{sel}}}) > 0",
        "step": "1m",
        "titleFormat": "{{detector}} alarm",
        "textFormat": "station $station, shift {{shift}}",
        "tagKeys": "shift,detector",
    }
    return dashboard(
        "driftline-station", "driftline / Station drill-down",
        "One station: its cluster mix, out-of-distribution rate and detectors over time.",
        [("Station", 4, summary), ("Cluster mix", 10, mix), ("Detectors", 9, drift)],
        templates=[station_variable(), shift],
        annotations=[alarms, incidents_annotation()],
    )


# --- pipeline health ---------------------------------------------------------------------------
def quantiles(metric: str) -> list[Target]:
    rate = f"sum by (le) (rate({metric}_bucket[5m]))"
    return [target(f"histogram_quantile(0.5, {rate})", "p50"),
            target(f"histogram_quantile(0.99, {rate})", "p99")]


def pipeline() -> Dashboard:
    stats = [
        stat("Embed lag", 'sum(driftline:kafka_consumer_lag_messages:sum{stage="embed"})',
             unit="short"),
        stat("Detect lag", 'sum(driftline:kafka_consumer_lag_messages:sum{stage="detect"})',
             unit="short"),
        stat("Dead-letter share", "driftline:embed_dead_letter_ratio:rate5m",
             unit="percentunit",
             description="Dead letters / records consumed (5 min rates): every record counts "
                         "once in driftline_embed_events_total, those that are no event as "
                         "kind=invalid.",
             steps=[{"color": "green", "value": None}, {"color": "red", "value": 0.05}]),
        stat("End-to-end p99", "driftline:pipeline_end_to_end_latency_seconds:p99_5m",
             unit="s", no_value="-"),
        stat("Oldest checkpoint", "max(driftline_detect_checkpoint_age_seconds)", unit="s",
             steps=[{"color": "green", "value": None}, {"color": "red", "value": 60}],
             no_value="-"),
        stat("Targets up", 'count(up{job=~"driftline-.*"} == 1)',
             description="driftline processes Prometheus scrapes successfully."),
    ]
    kafka = [
        series("Consumer lag per partition",
               target("sum by (stage, partition) (driftline_kafka_consumer_lag_messages)",
                      "{{stage}} p{{partition}}"), unit="short"),
        series("Assigned partitions per worker",
               target("driftline_kafka_assigned_partitions", "{{stage}} {{instance}}"),
               description="A worker with 0 partitions is idle: more replicas than partitions."),
    ]
    flow = [
        series("Throughput",
               target("sum by (kind) (rate(driftline_embed_events_total[5m]))",
                      "events in ({{kind}})"),
               target("sum(rate(driftline_embed_slice_updates_total[5m]))",
                      "slice-updates out"),
               target("sum(rate(driftline_detect_slice_updates_total[5m]))",
                      "slice-updates applied"),
               target("sum(rate(driftline_detect_duplicates_total[5m]))",
                      "duplicates skipped"),
               unit="reqps",
               description="Events in counts every record consumed; invalid: records that "
                           "are no event (dead-lettered at parsing). Duplicates are replayed "
                           "slice-updates that the detect stage skipped by source offset "
                           "(after a restart or rebalance)."),
        series("Dead letters by reason",
               target("driftline:embed_dead_letters:rate5m", "{{reason}}"), unit="reqps",
               drawStyle="bars", fillOpacity=60, stacking={"mode": "normal", "group": "A"}),
        series("Skipped slice-updates by reason",
               target("sum by (reason) (rate(driftline_detect_skipped_total[5m]))",
                      "{{reason}}"), unit="reqps",
               description="Counted once the checkpoint past them lands. unreadable: not a "
                           "slice-update; unusable: names a baseline or cluster the loaded "
                           "reference lacks; other_reference: embedded against another "
                           "reference (a rolling restart after an activation); "
                           "other_reference_label: a late label of an event embedded on "
                           "another reference (expected for a while after an activation); "
                           "retired: for a slice retired as idle.",
               drawStyle="bars", fillOpacity=60, stacking={"mode": "normal", "group": "A"}),
    ]
    latency = [
        series("Embed latency per batch", *quantiles("driftline_embed_latency_seconds"),
               unit="s"),
        series("End to end latency", *quantiles("driftline_pipeline_end_to_end_latency_seconds"),
               unit="s", description="From the event's arrival in Kafka to its effect on the "
                                      "detectors."),
        series("Events per embed batch",
               target("sum(rate(driftline_embed_batch_size_events_sum[5m])) / "
                      "sum(rate(driftline_embed_batch_size_events_count[5m]))", "mean")),
    ]
    state = [
        series("Checkpoints by outcome",
               target("sum by (outcome) (rate(driftline_detect_checkpoints_total[5m]))",
                      "{{outcome}}"), unit="ops",
               description="failed: Redis unreachable, retried while updates are applied in "
                           "memory. fenced: a worker lost partitions to a newer owner and "
                           "dropped its stale state (expected briefly during rebalances). "
                           "dropped: Redis unreachable when partitions were revoked; the work "
                           "is read again from the last checkpoint."),
        series("Checkpoint age per worker",
               target("driftline_detect_checkpoint_age_seconds", "{{instance}}"), unit="s"),
        series("Live slices per worker",
               target("driftline_detect_live_slices", "{{instance}}")),
    ]
    targets = [
        series("Targets up", target('up{job=~"driftline-.*"}', "{{job}} {{instance}}"),
               drawStyle="line", lineInterpolation="stepAfter"),
    ]
    return dashboard(
        "driftline-pipeline", "driftline / Pipeline health",
        "Kafka lag, latency, dead letters, checkpoints and duplicates of the two stages.",
        [("Now", 4, stats), ("Kafka", 8, kafka), ("Flow", 8, flow), ("Latency", 8, latency),
         ("Detect state", 8, state), ("Targets", 6, targets)],
    )


DASHBOARDS = {"fleet": fleet, "station": station, "pipeline": pipeline}


def render_all() -> dict[str, str]:
    """File name -> JSON text, exactly as committed."""
    return {
        f"{name}.json": json.dumps(build().to_json_data(), sort_keys=True, indent=2,
                                   cls=DashboardEncoder) + "\n"
        for name, build in DASHBOARDS.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DASHBOARD_DIR, help="output directory")
    parser.add_argument("--check", action="store_true",
                        help="compare with the files in --out instead of writing them")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render_all().items():
        path = args.out / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path)
    if stale:
        print("stale (run deploy/grafana/generate.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
