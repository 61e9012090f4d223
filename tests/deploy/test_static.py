"""Static checks of deploy/ and the Dockerfile: no daemon, no network, a few seconds.

Prometheus rules and config go through Debian's promtool, Alertmanager's config through amtool
(installed with deploy/local's apt helper when missing; skipped only if that is impossible);
compose.yaml is validated against the Compose Specification JSON Schema shipped in
deploy/schema/; dashboards must equal their generator's output; every metric that a rule or a
dashboard queries must exist in driftline.metrics.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, cast
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from kafka import KafkaAdminClient
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

import driftline.alerts.routing
import driftline.metrics
import driftline.runner
import driftline.service.observe
from driftline.alerts.model import Incident, Severity, Status
from driftline.alerts.routing import ALERTNAME, RESEND_INTERVAL_S, Router
from driftline.config import ENV_PREFIX, SLICE_DIMENSIONS, Settings, parse_tokens
from driftline.consumers.kafka_io import BROKER_WAIT_S

yaml = pytest.importorskip("yaml", reason="PyYAML is a dev dependency")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
K8S = DEPLOY / "k8s"

# Modules whose *Metrics classes define every metric driftline exports: the stages', the
# failure book's (incidents, alert deliveries) and the API's.
METRIC_MODULES = (driftline.metrics, driftline.alerts.routing, driftline.service.observe)
TARGET_LABELS = {"job", "instance"}  # added by Prometheus at scrape time
# `driftline run ROLE` for each pipeline role, `run all`, and the triage API.
STAGE_ROLES = {("run", role) for role in driftline.runner.ROLES}
ROLES = STAGE_ROLES | {("run", "all"), ("serve",)}
DRIFTLINE_JOBS = {f"driftline-{role}" for role in (*driftline.runner.ROLES, "api")}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_all_yaml(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# --- tools ---------------------------------------------------------------------------------
@cache
def _tool(name: str, package: str) -> str | None:
    """Path of a Debian-packaged tool, installing the package with deploy/local's helper."""
    found = shutil.which(name)
    if found is None and shutil.which("apt-get") and (ROOT / "deploy/local/lib.sh").is_file():
        subprocess.run(
            ["bash", "-c", f'source deploy/local/lib.sh && apt_install "{package}"'],
            cwd=ROOT, capture_output=True, timeout=600, check=False)
        found = shutil.which(name)
    return found


def tool(name: str, package: str) -> str:
    path = _tool(name, package)
    if path is None:
        pytest.skip(f"{name} is missing and `apt-get install {package}` was not possible here")
    return path


def run(*cmd: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
    return done


# --- Prometheus and Alertmanager ----------------------------------------------------------
def test_promtool_checks_the_rules() -> None:
    out = run(tool("promtool", "prometheus"), "check", "rules", str(PROM / "rules.yml"))
    assert "SUCCESS" in out.stdout


def test_promtool_rule_unit_tests_pass() -> None:
    run(tool("promtool", "prometheus"), "test", "rules", "rules_test.yml", cwd=PROM)


def test_promtool_checks_the_compose_prometheus_config() -> None:
    run(tool("promtool", "prometheus"), "check", "config", "prometheus.yml", cwd=PROM)


def alerts() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(PROM / "rules.yml")["groups"]
            for rule in group["rules"] if "alert" in rule]


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    cases: dict[str, set[bool]] = {}
    for test in load_yaml(PROM / "rules_test.yml")["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
    for rule in alerts():
        assert cases.get(rule["alert"]) == {True, False}, (
            f"{rule['alert']}: needs a firing and a not-firing case in rules_test.yml")


def test_alerts_carry_severity_component_and_text() -> None:
    for rule in alerts():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["labels"].get("component"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
        assert rule["alert"].startswith("Driftline"), rule["alert"]


def test_scrape_jobs_match_the_jobs_the_rules_and_compose_name() -> None:
    config = load_yaml(PROM / "prometheus.yml")
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    exprs = " ".join(rule["expr"] for rule in alerts())
    named = set(re.findall(r'job="([^"]+)"', exprs))
    for pattern in re.findall(r'job=~"([^"]+)"', exprs):
        matched = {job for job in jobs if re.fullmatch(pattern, job)}
        assert matched, f"job=~{pattern!r} matches no scrape job"
        named |= matched
    assert named <= jobs
    services = set(load_yaml(DEPLOY / "compose.yaml")["services"])
    driftline_jobs = {job for job in jobs if job.startswith("driftline-")}
    assert driftline_jobs == DRIFTLINE_JOBS
    assert driftline_jobs <= services
    assert config["rule_files"] == ["rules.yml"]


def test_alertmanager_config_and_routes() -> None:
    amtool = tool("amtool", "prometheus-alertmanager")
    config = str(DEPLOY / "alertmanager/alertmanager.yml")
    run(amtool, "check-config", config)
    for labels, receiver in ((["severity=critical"], "oncall-pager"),
                             (["severity=critical", "deployment=plant-7"], "oncall-pager"),
                             ([f"alertname={ALERTNAME}", "severity=critical", "status=open",
                               "deployment=plant-7"], "oncall-pager"),
                             (["severity=warning"], "oncall-ticket"),
                             ([f"alertname={ALERTNAME}", "severity=critical", "status=open"],
                              "oncall-pager"),
                             ([f"alertname={ALERTNAME}", "severity=critical",
                               "status=acknowledged"], "oncall-ticket"),  # not paged again
                             ([f"alertname={ALERTNAME}", "severity=major"], "oncall-ticket")):
        out = run(amtool, "config", "routes", "test", f"--config.file={config}", *labels)
        assert out.stdout.split() == [receiver], (labels, out.stdout)


def incident_alert(severity: str, template: str, dims: dict[str, str],
                   incident_id: str | None = None, **alert_labels: str) -> dict[str, str]:
    """The labels of the failure book's alert for an incident rooted at ``dims``
    (Router.labels), with ``alert_labels`` configured (DRIFTLINE_ALERT_LABELS)."""
    root = SimpleNamespace(template=template, dims=dims)
    incident = SimpleNamespace(id=incident_id or f"inc-{severity}-{template}",
                               severity=Severity(severity), root=root, status=Status.open,
                               active=True, timeline=[])
    router = SimpleNamespace(alert_labels=alert_labels)
    return Router.labels(cast(Router, router), cast(Incident, incident))


def external_labels() -> dict[str, str]:
    """The labels Prometheus (deploy/prometheus/prometheus.yml) puts on the alerts it sends."""
    return cast(dict[str, str], load_yaml(PROM / "prometheus.yml")["global"]["external_labels"])


def compose_alert_labels() -> dict[str, str]:
    """DRIFTLINE_ALERT_LABELS of compose's driftline services, as the settings read it."""
    env = load_yaml(DEPLOY / "compose.yaml")["services"]["driftline-book"]["environment"]
    return Settings(alert_labels=env["DRIFTLINE_ALERT_LABELS"]).alert_labels


def pushed_alert_labels() -> set[str]:
    """Label names of the failure book's DriftlineIncident alerts, as compose configures it."""
    return set(incident_alert("major", "station+shift", {"station": "s1", "shift": "night"},
                              **compose_alert_labels()))


def rule_alert_labels() -> set[str]:
    """Label names the rules' alerts can carry: their own, aggregation labels, target labels,
    Prometheus's external labels."""
    names = set(TARGET_LABELS) | set(external_labels())
    for rule in alerts():
        names |= set(rule["labels"]) | {"alertname"}
        for group in re.findall(r"\bby \(([^)]*)\)", rule["expr"]):
            names |= {label.strip() for label in group.split(",")}
    return names


def test_alertmanager_groups_by_labels_that_alerts_carry() -> None:
    route = load_yaml(DEPLOY / "alertmanager/alertmanager.yml")["route"]
    pushed = pushed_alert_labels()
    assert {"incident_id", "root_template", "severity"} <= pushed
    assert set(route["group_by"]) <= pushed | rule_alert_labels(), (
        set(route["group_by"]) - pushed - rule_alert_labels())
    assert "incident_id" in route["group_by"], "one notification per incident"


_AM_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"?(.*?)"?')


def matches(matchers: list[str], labels: dict[str, str]) -> bool:
    """Alertmanager's matchers (regexes anchored; a missing label reads as "")."""
    for matcher in matchers:
        found = _AM_MATCHER.fullmatch(matcher.strip())
        assert found, matcher
        name, op, value = found.groups()
        got = labels.get(name, "")
        hit = {"=": got == value, "!=": got != value,
               "=~": re.fullmatch(value, got) is not None,
               "!~": re.fullmatch(value, got) is None}[op]
        if not hit:
            return False
    return True


def inhibited(target: dict[str, str], source: dict[str, str]) -> bool:
    """Whether alertmanager.yml's inhibit_rules mute ``target`` while ``source`` fires."""
    rules = load_yaml(DEPLOY / "alertmanager/alertmanager.yml")["inhibit_rules"]
    return any(matches(rule["target_matchers"], target)
               and matches(rule["source_matchers"], source)
               and all(source.get(label, "") == target.get(label, "")
                       for label in rule.get("equal", []))
               for rule in rules)


def test_a_critical_incident_inhibits_the_warnings_of_its_own_root_slice_only() -> None:
    roots = [(dim, {dim: value}) for dim in SLICE_DIMENSIONS for value in ("a", "b")]
    roots += [("station+shift", {"station": "a", "shift": "a"}),
              ("station+lot", {"station": "a", "lot": "a"})]
    for source_root in roots:
        critical = incident_alert("critical", *source_root)
        for target_root in roots:
            warning = incident_alert("warning", *target_root)
            assert inhibited(warning, critical) == (target_root == source_root), (
                source_root, target_root)


def test_a_critical_incident_inhibits_the_warnings_of_its_own_deployment_only() -> None:
    """Two plants' books, sharing an Alertmanager, can open incidents at a slice of the same
    name (station press-3): one's critical incident must not mute the other's warning. The
    rule requires `deployment` equal, which DRIFTLINE_ALERT_LABELS puts on the book's alerts;
    unset on both sides, one deployment, as before."""
    rule, = [r for r in load_yaml(DEPLOY / "alertmanager/alertmanager.yml")["inhibit_rules"]
             if r["source_matchers"] == ['severity="critical"']]
    assert "deployment" in rule["equal"]
    for template, dims in (("station", {"station": "press-3"}),
                           ("station+shift", {"station": "press-3", "shift": "night"}),
                           ("lot", {"lot": "L7"})):
        critical_a = incident_alert("critical", template, dims, deployment="plant-a")
        warning_a = incident_alert("warning", template, dims, deployment="plant-a")
        warning_b = incident_alert("warning", template, dims, deployment="plant-b")
        assert inhibited(warning_a, critical_a), template
        assert not inhibited(warning_b, critical_a), template
        assert not inhibited(warning_b, incident_alert("critical", template, dims)), template
        assert inhibited(incident_alert("warning", template, dims),
                         incident_alert("critical", template, dims)), template


def test_two_deployments_incidents_are_separate_alerts_and_notifications() -> None:
    """Every book numbers its incidents from DL-000001: two deployments' first incidents at
    press-3 had the same label set (one alert to Alertmanager: either book's resolve ended
    the other's page) and the same group. Their `deployment` labels keep them apart."""
    route = load_yaml(DEPLOY / "alertmanager/alertmanager.yml")["route"]
    assert "deployment" in route["group_by"]
    a, b = (incident_alert("critical", "station", {"station": "press-3"}, "DL-000001",
                           deployment=name) for name in ("plant-a", "plant-b"))
    assert a != b
    assert ([a.get(label) for label in route["group_by"]]
            != [b.get(label) for label in route["group_by"]])
    # the rules' alerts of two deployments too: a station of the same name, silent in both
    silent = rule_alert("DriftlineStationSilent", station="press-3")
    groups = {tuple({**silent, "deployment": d}.get(label) for label in route["group_by"])
              for d in ("plant-a", "plant-b")}
    assert len(groups) == 2


def test_the_book_s_alerts_carry_the_deployment_prometheus_gives_the_rules() -> None:
    """The inhibitions and grouping compare the book's `deployment` with the rules': compose
    sets the book's DRIFTLINE_ALERT_LABELS to Prometheus's external label, and the k8s
    config map to the value its README tells to give Prometheus."""
    assert compose_alert_labels() == {"deployment": external_labels()["deployment"]}
    config = next(d for d in manifests() if d["kind"] == "ConfigMap")["data"]
    k8s = Settings(alert_labels=config["DRIFTLINE_ALERT_LABELS"]).alert_labels
    assert set(k8s) == {"deployment"}
    text = " ".join((K8S / "README.md").read_text().split())
    assert f"`external_labels: {{deployment: {k8s['deployment']}}}`" in text
    assert f"`DRIFTLINE_ALERT_LABELS: deployment={k8s['deployment']}`" in text


def rule_alert(name: str, **labels: str) -> dict[str, str]:
    """The labels of a firing alert of rules.yml: its rule's, and ``labels`` (those its
    expression keeps: aggregation and target labels)."""
    (rule,) = [rule for rule in alerts() if rule["alert"] == name]
    return {"alertname": name, **rule["labels"], **labels}


def test_incident_fallbacks_keep_quiet_exactly_while_pushed_alerts_live() -> None:
    """A pushed DriftlineIncident alert lives in Alertmanager until resolve_timeout after the
    book's last push (it sets no endsAt while the incident is active); the Prometheus
    fallbacks keep quiet while a push succeeded within that window (rules_test.yml)."""
    resolve = load_yaml(DEPLOY / "alertmanager/alertmanager.yml")["global"]["resolve_timeout"]
    assert RESEND_INTERVAL_S < seconds(resolve)
    pushed = f'driftline_alerts_pushes_total{{target="alertmanager",outcome="ok"}}[{resolve}]'
    for name in ("DriftlineCriticalIncidentOpen", "DriftlineWarningIncidentOpen"):
        (rule,) = [rule for rule in alerts() if rule["alert"] == name]
        assert pushed in rule["expr"] and "unless on ()" in rule["expr"], name


def test_one_embed_worker_does_not_mute_silent_stations_fleet_wide() -> None:
    """Its partitions move to the other workers long before a station counts as silent; a
    station silent while that worker is down or stalled must still page."""
    silent = rule_alert("DriftlineStationSilent", station="s9")
    worker = {"instance": "10.0.0.7:8080"}
    for source in (rule_alert("DriftlineWorkerDown", job="driftline-embed", **worker),
                   rule_alert("DriftlineEmbedStalled", **worker)):
        assert not inhibited(silent, source), source["alertname"]


def test_a_whole_stage_absent_mutes_its_own_per_worker_and_per_station_alerts_only() -> None:
    """With no embed worker up every station falls silent: one page for the stage, not a
    warning per station and worker. Nothing else is muted, and no embed worker alone mutes
    what the absent stage does (test above)."""
    embed_absent = rule_alert("DriftlineEmbedStageAbsent")
    api_absent = rule_alert("DriftlineApiAbsent")
    worker = {"instance": "10.0.0.7:8080"}
    embed_down = rule_alert("DriftlineWorkerDown", job="driftline-embed", **worker)
    api_down = rule_alert("DriftlineWorkerDown", job="driftline-api", **worker)
    muted = [rule_alert("DriftlineStationSilent", station="s9"),
             rule_alert("DriftlineEmbedStalled", **worker), embed_down]
    for target in muted:
        assert inhibited(target, embed_absent), target["alertname"]
        assert not inhibited(target, api_absent), target["alertname"]
    assert inhibited(api_down, api_absent)
    others = [api_down, rule_alert("DriftlineDetectStalled", **worker),
              rule_alert("DriftlineDetectWorkerDown", job="driftline-detect", **worker),
              rule_alert("DriftlineConsumerLagHigh", stage="embed"),
              rule_alert("DriftlineDeadLetterRateHigh"), rule_alert("DriftlineBookDown"),
              rule_alert("DriftlineDetectStageAbsent"),
              incident_alert("critical", "station", {"station": "s9"}),
              incident_alert("warning", "station", {"station": "s9"})]
    for target in others:
        assert not inhibited(target, embed_absent), target["alertname"]
    assert not inhibited(embed_absent, rule_alert("DriftlineDetectStageAbsent"))
    assert not inhibited(embed_absent, api_absent)


def stage_absent_alerts() -> list[str]:
    return [rule["alert"] for rule in alerts() if rule["expr"].lstrip().startswith("absent(")]


def test_stage_absent_inhibitions_require_the_same_deployment() -> None:
    """An absent() alert keeps no label of the stage it misses, so only Prometheus's
    `deployment` external label, put on every alert it sends, tells two driftline
    deployments sharing an Alertmanager apart: one's absent embed stage must not mute the
    other's silent stations and down workers."""
    external = load_yaml(PROM / "prometheus.yml")["global"]["external_labels"]
    assert "deployment" in external
    rules = load_yaml(DEPLOY / "alertmanager/alertmanager.yml")["inhibit_rules"]
    # by its name: the rule of critical over warning alerts, of one slice, is another matter
    sourced = [rule for rule in rules
               if any(m.startswith("alertname") for m in rule["source_matchers"])
               and any(matches(rule["source_matchers"], rule_alert(name))
                       for name in stage_absent_alerts())]
    assert sourced
    for rule in sourced:
        assert "deployment" in rule.get("equal", []), rule
    worker = {"instance": "10.0.0.7:8080"}
    pairs = [(rule_alert("DriftlineEmbedStageAbsent"),
              rule_alert("DriftlineStationSilent", station="s9")),
             (rule_alert("DriftlineEmbedStageAbsent"),
              rule_alert("DriftlineWorkerDown", job="driftline-embed", **worker)),
             (rule_alert("DriftlineDetectStageAbsent"),
              rule_alert("DriftlineDetectStalled", **worker)),
             (rule_alert("DriftlineApiAbsent"),
              rule_alert("DriftlineWorkerDown", job="driftline-api", **worker))]
    for source, target in pairs:
        what = (source["alertname"], target["alertname"])
        assert inhibited({**target, "deployment": "a"}, {**source, "deployment": "a"}), what
        assert not inhibited({**target, "deployment": "b"}, {**source, "deployment": "a"}), what
        assert inhibited(target, source), what  # no external label: one deployment


# --- metrics referenced by rules and dashboards -----------------------------------------------
@cache
def known_metrics() -> dict[str, frozenset[str]]:
    """Sample name -> label names, from every *Metrics class of driftline.metrics.

    Labelled metrics emit no sample until a child exists, so names come from each metric's type
    (a counter samples as ``<name>_total``, a histogram as ``_bucket``, ``_sum``, ``_count``),
    and a collector's (the detect stage's per-slice gauges) from the gauges it defines.
    """
    registry = CollectorRegistry()
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created")}
    out: dict[str, frozenset[str]] = {}
    for module in METRIC_MODULES:
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if not name.endswith("Metrics") or cls.__module__ != module.__name__:
                continue
            for metric in vars(cls(registry)).values():
                if isinstance(metric, driftline.metrics.SliceGauges):
                    out.update((d.name, frozenset(d.labelnames)) for d in metric.families)
                    continue
                labels = frozenset(metric._labelnames)  # no public accessor in client_python
                for suffix in suffixes[metric._type]:
                    extra = {"le"} if suffix == "_bucket" else set()
                    out[metric._name + suffix] = labels | extra
    assert {"driftline_embed_events_total", "driftline_kafka_consumer_lag_messages",
            "driftline_detect_statistic_ratio", "driftline_incidents_total",
            "driftline_alerts_pushes_total", "driftline_api_requests_total"} <= set(out)
    assert out["driftline_incidents_open"] == {"severity", "status"}
    assert out["driftline_detect_open_alarms"] == {"station", "shift", "detector"}
    return out


@cache
def recorded_series() -> frozenset[str]:
    return frozenset(rule["record"] for group in load_yaml(PROM / "rules.yml")["groups"]
                     for rule in group["rules"] if "record" in rule)


_SELECTOR = re.compile(r"(?<![\w:])(driftline[_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")


def check_expr(expr: str, where: str) -> int:
    """Assert that every driftline series in a PromQL expression exists; return their count."""
    known, recorded = known_metrics(), recorded_series()
    found = 0
    for name, matchers in _SELECTOR.findall(expr):
        found += 1
        if name in recorded:
            continue
        assert name in known, f"{where}: {name} is not exported by driftline.metrics"
        used = set(_MATCHER.findall(matchers)) - TARGET_LABELS
        assert used <= known[name], f"{where}: {name} has no label(s) {used - known[name]}"
    return found


def test_rules_query_only_exported_metrics() -> None:
    for group in load_yaml(PROM / "rules.yml")["groups"]:
        for rule in group["rules"]:
            check_expr(rule["expr"], rule.get("alert") or rule["record"])
    for rule in recorded_series():
        assert re.fullmatch(r"driftline:[a-z0-9_]+:[a-z0-9_]+", rule), rule


def dashboard_exprs(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            yield f"{board['uid']} / {panel['title']}", target["expr"]
    for variable in board["templating"]["list"]:
        yield f"{board['uid']} / ${variable['name']}", variable["query"]
    for annotation in board["annotations"]["list"]:
        yield f"{board['uid']} / annotation {annotation['name']}", annotation["expr"]


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text())
            for path in sorted((GRAFANA / "dashboards").glob("*.json"))}


def test_dashboards_query_only_exported_metrics() -> None:
    for board in dashboards().values():
        count = sum(check_expr(expr, where) for where, expr in dashboard_exprs(board))
        assert count >= 5, board["uid"]


def test_dashboards_show_alarms_from_the_open_alarm_gauge_not_the_ratio() -> None:
    """The detect stage publishes the statistic/threshold ratio at checkpoints, after the update
    that crossed 1 restarted its detector: it is below 1 whenever scraped, so a panel or
    annotation asking for ``ratio >= 1`` never showed an alarm."""
    ratio = re.compile(r"driftline[_:]detect_statistic_ratio")
    compared = re.compile(r"(>=|>|==)\s*1(\.0*)?(?![\d.])")
    for board in dashboards().values():
        for where, expr in dashboard_exprs(board):
            assert not (ratio.search(expr) and compared.search(expr)), f"{where}: {expr}"
    boards = dashboards()
    stations_in_alarm = next(p for p in boards["fleet.json"]["panels"]
                             if p["title"] == "Stations in alarm")
    assert "driftline_detect_open_alarms" in stations_in_alarm["targets"][0]["expr"]
    markers = boards["station.json"]["annotations"]["list"]
    assert any("driftline_detect_open_alarms" in a["expr"] for a in markers)


def test_each_alert_s_dashboard_shows_the_metrics_it_reads() -> None:
    """An alert's ``dashboard`` annotation sends the on-call there: it must show what fired
    (skipped updates for DriftlineMixedReferences, deliveries for the book's alerts), a
    recorded series standing for the metrics it is recorded from. The fleet dashboard, where
    the incident alerts link, also shows the held incidents that the open counts leave out."""
    name = re.compile(r"(?<![\w:])(driftline[_:][A-Za-z0-9_:]*)")
    rules = [r for g in load_yaml(PROM / "rules.yml")["groups"] for r in g["rules"]]
    sources = {r["record"]: set(name.findall(r["expr"])) for r in rules if "record" in r}
    boards = {b["uid"]: b for b in dashboards().values()}

    def shown(uid: str) -> set[str]:
        found = {n for _, expr in dashboard_exprs(boards[uid]) for n in name.findall(expr)}
        return found | {m for n in found for m in sources.get(n, ())}

    for rule in rules:
        if "alert" not in rule:
            continue
        uid = re.fullmatch(r"/d/([\w-]+)(\?.*)?", rule["annotations"]["dashboard"])
        assert uid and uid.group(1) in boards, rule["alert"]
        missing = set(name.findall(rule["expr"])) - shown(uid.group(1))
        assert not missing, f"{rule['alert']}: {uid.group(1)} does not show {missing}"
    assert "driftline_incidents_held" in shown("driftline-fleet")


# --- Grafana --------------------------------------------------------------------------------
def generator() -> ModuleType:
    pytest.importorskip("grafanalib", reason="grafanalib is in the `deploy` extra")
    spec = importlib.util.spec_from_file_location("driftline_dashboards", GRAFANA / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_dashboards_equal_the_generator_output() -> None:
    rendered = generator().render_all()
    assert set(rendered) == {"fleet.json", "station.json", "pipeline.json"}
    assert set(rendered) == set(dashboards())
    for name, text in rendered.items():
        assert (GRAFANA / "dashboards" / name).read_text() == text, (
            f"{name} is stale: run `python deploy/grafana/generate.py`")


def test_dashboards_use_the_provisioned_datasource() -> None:
    provisioned = load_yaml(GRAFANA / "provisioning/datasources/driftline.yml")["datasources"]
    prometheus = [ds for ds in provisioned if ds["type"] == "prometheus"]
    assert [ds["uid"] for ds in prometheus] == ["prometheus"]
    uids = set()
    for board in dashboards().values():
        text = json.dumps(board)
        uids |= set(re.findall(r'"uid": "([^"]+)"', text)) - {board["uid"]}
    assert uids == {"prometheus"}
    boards = dashboards()
    assert {b["uid"] for b in boards.values()} == {
        "driftline-fleet", "driftline-station", "driftline-pipeline"}
    station = boards["station.json"]
    assert [v["name"] for v in station["templating"]["list"]][0] == "station"
    assert station["annotations"]["list"], "station drill-down needs alarm/incident markers"
    provider = load_yaml(GRAFANA / "provisioning/dashboards/driftline.yml")["providers"][0]
    compose = load_yaml(DEPLOY / "compose.yaml")["services"]["grafana"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in compose["volumes"]


def test_dashboard_annotations_name_a_dashboard_and_its_variables() -> None:
    """The rules' and the book's pushed alerts' ``dashboard`` annotations are Grafana paths
    (README: a receiver's template puts Grafana's URL before them)."""
    boards = {b["uid"]: {v["name"] for v in b.get("templating", {}).get("list", [])}
              for b in dashboards().values()}
    pushed = [driftline.alerts.routing.dashboard(cast(Incident, SimpleNamespace(
        root=SimpleNamespace(dims=dims))))
        for dims in ({"station": "s 1", "shift": "night"}, {"station": "s 1"}, {"lot": "L7"})]
    paths = pushed + [rule["annotations"]["dashboard"] for rule in alerts()]
    for path in paths:
        found = re.fullmatch(r"/d/([\w-]+)(?:\?(.*))?", path)
        assert found, path
        assert found[1] in boards, path
        for param in filter(None, (found[2] or "").split("&")):
            name = param.split("=")[0]
            assert name.startswith("var-") and name[4:] in boards[found[1]], path
    assert pushed[0] == "/d/driftline-station?var-station=s+1&var-shift=night"


ODD_STATION = "Line 3 & B/2#x"  # a space, a parameter separator, a path separator, a fragment
# Grafana's variables that are a query string already: it never encodes them again
URL_READY_VARIABLES = {"__url_time_range", "__all_variables"}
_GRAFANA_VARIABLE = re.compile(r"\$\{([^}:]+)(?::([^}]*))?\}|\$(\w+)|\[\[(\w+)\]\]")
_QUERY_VALUE = re.compile(r"[?&][\w.-]+=([^&\s`]*)")


def json_strings(node: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """(key, text) of every string in a dashboard's JSON."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from json_strings(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from json_strings(v, key)
    elif isinstance(node, str):
        yield key, node


def test_dashboard_links_percent_encode_the_values_they_interpolate() -> None:
    """A station name is free text: put in a link raw, a '#' cut it short and a '&' split it
    into other parameters (Grafana before 10 encodes no data-link value by default; the
    explicit format holds on any version). Every variable in a link's URL, or in a query
    parameter a text panel shows, is `${name:percentencode}`, but Grafana's own query-string
    variables; with ODD_STATION put in as percentencode does, the link names it whole."""
    links = values = 0
    for board in dashboards().values():
        for key, text in json_strings(board):
            parts = [text] if key == "url" else _QUERY_VALUE.findall(text)
            for part in parts:
                for braced, fmt, bare, _deprecated in _GRAFANA_VARIABLE.findall(part):
                    values += 1
                    if (braced or bare) in URL_READY_VARIABLES:
                        assert not fmt, (board["uid"], text)
                        continue
                    assert braced and fmt == "percentencode", (board["uid"], text)
            if key != "url" or not text:  # a dashboard-list link has an empty one
                continue
            links += 1
            rendered = re.sub(r"\$\{[^}:]+:percentencode\}", quote(ODD_STATION, safe=""), text)
            parts = urlsplit(rendered.replace("${__url_time_range}", "from=now-6h&to=now"))
            assert not parts.fragment, rendered
            query = parse_qs(parts.query)
            if "${__url_time_range}" in text:
                assert query.pop("from") == ["now-6h"] and query.pop("to") == ["now"], rendered
            assert all(v == [ODD_STATION] for v in query.values()), rendered
    assert links >= 2 and values >= 5, (links, values)


def test_rule_links_escape_the_label_values_they_interpolate() -> None:
    """A label value in a link goes through Go's `urlquery` (url.QueryEscape): a station
    named with '&' or '#' would otherwise split the query or end it."""
    for rule in alerts():
        for name, text in rule["annotations"].items():
            if not (name in {"dashboard", "link"} or text.startswith(("/", "http"))):
                continue
            for action in re.findall(r"{{(.*?)}}", text):
                assert re.fullmatch(r"\s*\$labels\.\w+\s*\|\s*urlquery\s*", action), (
                    rule["alert"], name, text)


def test_rule_links_rendered_by_promtool_keep_the_station_whole() -> None:
    """rules_test.yml's expected dashboard links (which promtool checks the templates render)
    name the alert's station exactly, one with every character that needs escaping too."""
    stations = set()
    for test in load_yaml(PROM / "rules_test.yml")["tests"]:
        for case in test.get("alert_rule_test", []):
            for alert in case.get("exp_alerts") or []:
                link = alert.get("exp_annotations", {}).get("dashboard", "")
                station = alert["exp_labels"].get("station")
                if station is None or "?" not in link:
                    continue
                parts = urlsplit(link)
                assert not parts.fragment, link
                assert parse_qs(parts.query)["var-station"] == [station], link
                stations.add(station)
    assert ODD_STATION in stations


def test_the_book_s_dashboard_link_keeps_the_root_slice_whole() -> None:
    dims = {"station": ODD_STATION, "shift": "night/2 & #1"}
    link = driftline.alerts.routing.dashboard(cast(Incident, SimpleNamespace(
        root=SimpleNamespace(dims=dims))))
    parts = urlsplit(link)
    assert parts.path == driftline.alerts.routing.STATION_DASHBOARD
    assert not parts.fragment, link
    assert parse_qs(parts.query) == {"var-station": [dims["station"]],
                                     "var-shift": [dims["shift"]]}


# --- compose --------------------------------------------------------------------------------
def test_compose_validates_against_the_compose_specification() -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is a dev dependency")
    schema = json.loads((DEPLOY / "schema/compose-spec.json").read_text())
    assert schema["title"] == "Compose Specification"
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(load_yaml(DEPLOY / "compose.yaml")), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def settings_variables() -> set[str]:
    return {ENV_PREFIX + name.upper() for name in Settings.model_fields}


def test_compose_services_are_wired() -> None:
    compose = load_yaml(DEPLOY / "compose.yaml")
    services, volumes = compose["services"], set(compose["volumes"])
    for name, service in services.items():
        for dep, spec in service.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert spec["condition"] in {"service_healthy", "service_completed_successfully"}
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} has no healthcheck"
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in volumes, f"{name}: volume {source} is not declared"
        if name != "kafka-init":
            assert "healthcheck" in service, f"{name} has no healthcheck"
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    redis = services["redis"]["command"]
    assert redis[redis.index("--appendonly") + 1] == "yes"
    commands = {f"driftline-{role}": ["run", role] for role in driftline.runner.ROLES}
    for name, command in {**commands, "driftline-api": ["serve"]}.items():
        service = services[name]
        assert service["command"] == command
        assert service["build"] == {"context": "..", "dockerfile": "Dockerfile"}
        env = service["environment"]
        assert env["DRIFTLINE_KAFKA_BOOTSTRAP"] == "kafka:9092"
        assert env["DRIFTLINE_REDIS_URL"].startswith("redis://redis:")
        assert set(env) <= settings_variables(), set(env) - settings_variables()
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"


def seconds(duration: str) -> int:
    """A Compose duration such as ``1m30s``, in seconds."""
    found = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert found and duration, duration
    return int(found[1] or 0) * 60 + int(found[2] or 0)


def test_compose_gives_the_stages_the_grace_kubernetes_gives_them() -> None:
    """On SIGTERM a stage finishes its batch or step, checkpoints, commits and leaves its group;
    Docker's default 10 s is shorter than that path may take."""
    services = load_yaml(DEPLOY / "compose.yaml")["services"]
    for role in driftline.runner.ROLES:
        name = f"driftline-{role}"
        grace = deployment(name)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert "stop_grace_period" in services[name], name
        assert seconds(services[name]["stop_grace_period"]) == grace, name


# --- Dockerfile -----------------------------------------------------------------------------
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_basics() -> None:
    steps = dockerfile()
    froms = [args for word, args in steps if word == "FROM"]
    assert len(froms) >= 2, "multi-stage: a builder and a runtime"
    base = dict(re.findall(r"ARG (\w+)=(\S+)", " ".join(f"ARG {a}" for w, a in steps
                                                          if w == "ARG")))
    images = {base.get(f[2:-1], f) if f.startswith("${") else f
              for f in (args.split()[0] for args in froms)}
    assert images and all(re.fullmatch(r"python:3\.11-slim(-\w+)?", image) for image in images)
    final = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    runtime = steps[final:]
    users = [args for word, args in runtime if word == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "runs as a non-root user"
    runs = " ".join(args for word, args in steps if word == "RUN")
    assert "python -m pip install '.[demo]'" in runs, "same install step as scripts/dev.sh"
    assert "driftline model build-demo --cache-dir /opt/driftline/cache" in runs
    health = [args for word, args in runtime if word == "HEALTHCHECK"]
    assert len(health) == 1 and "/healthz" in health[0]
    assert ("ENTRYPOINT", '["driftline"]') in runtime
    assert ("CMD", '["run", "all"]') in runtime
    env = " ".join(args for word, args in runtime if word == "ENV")
    assert "DRIFTLINE_CACHE_DIR=/opt/driftline/cache" in env
    assert "DRIFTLINE_API_HOST=0.0.0.0" in env


def test_dockerignore_allows_only_what_the_build_copies() -> None:
    patterns = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line and not line.startswith("#")]
    assert patterns[0] == "*", "allow-list: .venv, .git and caches stay out of the context"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = {src.rstrip("/") for word, args in dockerfile() if word == "COPY"
              and "--from" not in args for src in args.split()[:-1]}
    assert copied <= allowed, copied - allowed
    assert "README.md" in allowed, "pyproject.toml names README.md as the readme"


# --- Kubernetes -----------------------------------------------------------------------------
def manifests() -> list[dict[str, Any]]:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    docs = []
    for resource in kustomization["resources"]:
        docs += load_all_yaml(K8S / resource)
    return docs


def test_k8s_deployments_have_probes_resources_and_run_as_non_root() -> None:
    docs = manifests()
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in docs}
    assert {("Deployment", f"driftline-{r}") for r in (*driftline.runner.ROLES, "api")} <= kinds
    assert ("Service", "driftline-api") in kinds
    assert ("ConfigMap", "driftline-config") in kinds
    roles = set()
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        spec = doc["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        (container,) = spec["containers"]
        roles.add(tuple(container["args"]))
        assert container["image"].split(":")[0] == "driftline"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), doc["metadata"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        refs = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
        assert refs == {"driftline-config", "driftline-secrets"}
        assert doc["spec"]["selector"]["matchLabels"].items() <= (
            doc["spec"]["template"]["metadata"]["labels"].items())
    assert roles == STAGE_ROLES | {("serve",)}, "one Deployment per role"
    assert roles <= ROLES
    service = next(d for d in docs if d["kind"] == "Service")
    api = next(d for d in docs if d["metadata"]["name"] == "driftline-api"
               and d["kind"] == "Deployment")
    assert service["spec"]["selector"].items() <= (
        api["spec"]["template"]["metadata"]["labels"].items())


def deployment(name: str) -> dict[str, Any]:
    return next(d for d in manifests() if d["kind"] == "Deployment"
                and d["metadata"]["name"] == name)


def test_k8s_book_runs_once_and_is_scraped() -> None:
    book = deployment("driftline-book")
    # A second processor delivers every change twice (driftline/alerts/processor.py).
    assert book["spec"]["replicas"] == 1
    assert book["spec"]["strategy"] == {"type": "Recreate"}
    template = book["spec"]["template"]
    assert template["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    (container,) = template["spec"]["containers"]
    assert container["args"] == ["run", "book"]
    port = int(template["metadata"]["annotations"]["prometheus.io/port"])
    assert port in {p["containerPort"] for p in container["ports"]}
    budgets = [d for d in manifests() if d["kind"] == "PodDisruptionBudget"]
    assert not [b for b in budgets if b["spec"]["selector"]["matchLabels"].items()
                <= template["metadata"]["labels"].items()], "one replica: a PDB only blocks drains"


def test_k8s_startup_probes_outlast_the_start_up_waits() -> None:
    """`driftline run` waits for the broker (the Kafka stages), then for Redis, before serving
    probes, then exits with a message naming the setting; the kubelet must not kill the pod
    before that message. The waits add up: a broker late by nearly its whole wait leaves Redis
    all of its own. The broker's last attempt, begun just before its wait is over, takes up to
    kafka-python's bootstrap timeout; the margin covers the retries' pauses, Redis's last
    attempt and loading the reference and the model."""
    broker = BROKER_WAIT_S + KafkaAdminClient.DEFAULT_CONFIG["bootstrap_timeout_ms"] / 1000
    for role in driftline.runner.ROLES:
        wait = driftline.runner.STARTUP_REDIS_WAIT_S
        if role in driftline.runner.BROKER_AT_START:
            wait += broker
        (container,) = deployment(f"driftline-{role}")["spec"]["template"]["spec"]["containers"]
        probe = container["startupProbe"]
        budget = probe["periodSeconds"] * probe["failureThreshold"]
        assert budget >= wait + 60, (role, budget, wait)


def test_reference_dir_is_inside_the_reference_volume() -> None:
    """write_artifact renames a sibling temporary directory onto DRIFTLINE_REFERENCE_DIR, and
    activation candidates are its siblings: it must be a directory below the mount point."""
    config = next(d for d in manifests() if d["kind"] == "ConfigMap")["data"]
    ref_dir = Path(config["DRIFTLINE_REFERENCE_DIR"])
    for doc in manifests():
        if doc["kind"] != "Deployment":
            continue
        spec = doc["spec"]["template"]["spec"]
        claims = {v["name"] for v in spec["volumes"]
                  if v.get("persistentVolumeClaim", {}).get("claimName") == "driftline-reference"}
        (container,) = spec["containers"]
        mounts = {m["mountPath"] for m in container["volumeMounts"] if m["name"] in claims}
        assert mounts == {str(ref_dir.parent)}, (doc["metadata"]["name"], mounts, ref_dir)
    compose = load_yaml(DEPLOY / "compose.yaml")["services"]
    for role in (*driftline.runner.ROLES, "api"):
        service = compose[f"driftline-{role}"]
        ref_dir = Path(service["environment"]["DRIFTLINE_REFERENCE_DIR"])
        mounts = {m.split(":")[1] for m in service["volumes"]
                  if m.split(":")[0] == "driftline-reference"}
        assert mounts == {str(ref_dir.parent)}, (role, mounts, ref_dir)
    # A new Docker volume takes the owner of the image's directory at its mount point.
    runs = " ".join(args for word, args in dockerfile() if word == "RUN")
    assert f"mkdir -p {ref_dir.parent} " in runs


def test_shipped_deployments_confine_file_uris_to_an_image_root() -> None:
    """Unset, DRIFTLINE_IMAGE_ROOTS lets a file:// event make the embed stage read, and the
    API show as a thumbnail, any image file the pod can read: whoever can write to the events
    topic could view them. The shipped configs name one directory, apart from the reference
    volume and the cache."""
    config = next(d for d in manifests() if d["kind"] == "ConfigMap")["data"]
    compose = load_yaml(DEPLOY / "compose.yaml")["services"]
    for env in (config, *(compose[f"driftline-{role}"]["environment"]
                          for role in (*driftline.runner.ROLES, "api"))):
        roots = [Path(r) for r in env["DRIFTLINE_IMAGE_ROOTS"].split(",")]
        assert roots == [Path("/var/lib/driftline/images")], roots
        for kept in ("DRIFTLINE_REFERENCE_DIR", "DRIFTLINE_CACHE_DIR"):
            if kept in env:
                assert not Path(env[kept]).is_relative_to(roots[0]), (kept, env[kept])
                assert not roots[0].is_relative_to(Path(env[kept]).parent), (kept, roots)


def test_k8s_config_names_only_real_settings_and_the_example_secret_is_refused() -> None:
    config = next(d for d in manifests() if d["kind"] == "ConfigMap")
    assert set(config["data"]) <= settings_variables(), set(config["data"]) - settings_variables()
    (secret,) = load_all_yaml(K8S / "secret.example.yaml")
    assert set(secret["stringData"]) <= settings_variables()
    with pytest.raises(ValueError):
        parse_tokens(SecretStr(secret["stringData"]["DRIFTLINE_API_TOKENS"]))
    names = {doc["metadata"]["name"] for doc in manifests()}
    assert "driftline-secrets" not in names, "apply -k must never overwrite the real Secret"


def test_k8s_readme_explains_scaling_against_partitions() -> None:
    text = (K8S / "README.md").read_text()
    for phrase in ("replicas ≤ partitions", "rebalance", "Redis", "## Scaling",
                   "ready but owns nothing"):  # /readyz does not wait for a partition
        assert phrase in text, phrase


def test_dockerfile_install_step_is_the_readmes_install_command() -> None:
    runs = re.findall(r"^RUN (python -m pip install .+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert runs, "the Dockerfile installs driftline with pip"
    readme = (ROOT / "README.md").read_text()
    for command in runs:
        assert command in readme, f"README lacks the Dockerfile's install step: {command}"
