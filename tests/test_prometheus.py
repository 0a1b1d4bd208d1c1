"""A real Prometheus (Debian's package) scrapes a real server with the deploy/ rules loaded; every
PromQL expression of the Grafana dashboard and of the rules runs against it; promtool unit-tests the alerts."""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import quote
from urllib.request import urlopen

import grpc
import pytest
import yaml

from client.stream import send_genie_feedback, stream_slots
from schema.dataset import read_slots
from tests.conftest import address_of

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "deeprx.json"


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{binary} is missing: `make test` installs Debian's prometheus package")
        pytest.skip(f"{binary} not installed (make test installs it)")
    return path


def test_promtool_accepts_the_shipped_config_and_rules():
    promtool = _require("promtool")
    for args in (["check", "rules", str(DEPLOY / "rules.yml")], ["check", "config", str(DEPLOY / "prometheus.yml")]):
        result = subprocess.run([promtool, *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_alerts_pass():
    """deploy/prometheus/rules.test.yml: every alert fires (and stays quiet) on synthetic series."""
    promtool = _require("promtool")
    result = subprocess.run([promtool, "test", "rules", str(DEPLOY / "rules.test.yml")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", (DEPLOY / "rules.test.yml").read_text()))
    assert tested == {r["alert"] for r in _rules() if "alert" in r}, "every alert has a unit test"


def test_dashboard_is_well_formed_for_provisioning():
    """What Grafana needs of a provisioned dashboard, checked without Grafana: unique panel ids and
    refIds, the provisioned datasource, panels that do not overlap on the 24-column grid, variables
    that the expressions use and that define an All value."""
    dashboard = json.loads(DASHBOARD.read_text())
    datasources = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {ds["uid"] for ds in datasources["datasources"]}
    assert dashboard["uid"] == "deeprx" and dashboard["title"]
    panels = [p for top in dashboard["panels"] for p in (top, *top.get("panels", []))]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids are unique"
    cells: dict[tuple[int, int], int] = {}
    for panel in panels:
        assert panel["type"] in {"row", "timeseries", "stat"} and panel["title"], panel["id"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        for cell in ((x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                     for y in range(grid["y"], grid["y"] + grid["h"])):
            assert cell not in cells, f"panel {panel['id']} overlaps panel {cells[cell]}"
            cells[cell] = panel["id"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] in uids and panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] in uids and target["expr"].strip(), (panel["title"], target)
    used = set(re.findall(r"\$(\w+)", json.dumps([p.get("targets", []) for p in panels])))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert used - {"__rate_interval", "__interval", "__range"} <= variables
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] in uids and variable["includeAll"] and variable["allValue"]


# ---------------------------------------------------------------------------------------- helpers
def _api(port: int, path: str) -> dict:
    """GET a Prometheus API path; a 4xx answer (a bad expression) is returned, not raised."""
    try:
        with urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return json.load(response)
    except HTTPError as err:
        return {"status": "error", "http": err.code, "error": err.read().decode(errors="replace")}


def _query(port: int, expression: str) -> dict:
    return _api(port, f"/api/v1/query?query={quote(expression)}")


def _lit(answer: dict) -> bool:
    """Data an operator would see: a non-empty result with at least one value that is not NaN."""
    if answer.get("status") != "success":
        return False
    result = answer["data"]["result"]
    if answer["data"]["resultType"] == "scalar":
        result = [{"value": result}]
    return any(not math.isnan(float(r["value"][1])) for r in result)


@contextlib.contextmanager
def _prometheus(tmp_path: Path, metrics_port: int):
    """Prometheus on a free loopback port with a temp TSDB, scraping ``metrics_port`` every second
    with deploy/prometheus/rules.yml loaded (evaluated every second). Yields its port once it scrapes."""
    prometheus = _require("prometheus")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    shutil.copy(DEPLOY / "rules.yml", tmp_path / "rules.yml")
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\nrule_files: [rules.yml]\n"
        f"scrape_configs:\n  - job_name: deeprx\n    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n")
    process = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _poll(port, 'up{job="deeprx"} == 1', lambda r: bool(r), 60), "Prometheus scrapes the service"
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


def _poll(port: int, expression: str, accept, seconds: float = 60) -> list:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            answer = _query(port, expression)
            if answer.get("status") == "success" and accept(answer["data"]["result"]):
                return answer["data"]["result"]
        except (OSError, URLError):
            pass  # not listening yet
        time.sleep(0.5)
    return []


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load((DEPLOY / "rules.yml").read_text())["groups"] for rule in group["rules"]]


def _dashboard_expressions() -> dict[str, str]:
    """Every PromQL expression of the dashboard, by a readable name: each panel's targets (panels nested
    in collapsed rows too) and each query variable, with Grafana's variables replaced by concrete values."""
    dashboard = json.loads(DASHBOARD.read_text())
    values = {
        # Grafana derives these from the scrape interval, panel width and time range; 5m spans this
        # whole test, so what a panel shows does not depend on how fast this machine runs it
        "__rate_interval": "5m", "__interval": "1m",
        "__range": dashboard["time"]["from"].removeprefix("now-"),  # the dashboard's default range (30m)
    }
    for variable in dashboard["templating"]["list"]:  # All -> the variable's allValue (a regex for =~)
        assert variable.get("includeAll") and variable.get("allValue"), variable["name"]
        values[variable["name"]] = variable["allValue"]

    def concrete(expr: str) -> str:
        out = re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]",
                     lambda m: values[next(g for g in m.groups() if g)], expr)
        assert "$" not in out, out
        return out

    expressions = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # label_values(metric, label) is Grafana's; PromQL's equivalent
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            metric, label = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query).groups()
            expressions[f"variable ${variable['name']}"] = f"group by ({label}) ({concrete(metric)})"

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                expressions[f"panel {panel['id']} '{panel['title']}' {target['refId']}"] = concrete(target["expr"])
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return expressions


def _rule_expressions() -> dict[str, str]:
    out = {}
    for rule in _rules():
        if "record" in rule:
            out[f"record {rule['record']}"] = rule["expr"]
            out[f"recorded {rule['record']}"] = rule["record"]  # the series Prometheus wrote
        else:
            out[f"alert {rule['alert']}"] = rule["expr"]
    return out


# Expressions allowed to return nothing (or only NaN) in the scenario below, and why. Every other
# dashboard panel target, recording rule and recorded series must show data.
ALLOWED_EMPTY = {
    # alerts: a healthy service answers nothing to these
    "alert DeepRxHighRejectedRequestRate": "a handful of rejections against many RPCs; besides, each code's first "
                                           "rejection creates its series, which rate() does not count",
    "alert DeepRxCaptureDroppingSamples": "about a hundred slots never fill the capture queue (4096)",
    "alert DeepRxLabelFreeEstimatesDropped": "the observer queue (4096) never fills either",
    "alert DeepRxSlotLatencyP99High": "p99 stays under 250 ms unless this shared machine is very busy: either way is fine",
    "alert DeepRxAdaptationRollback": "no rollback: the accepted version gets no live feedback afterwards",
    "alert DeepRxAdaptationFailing": "the one job is accepted",
    "alert DeepRxInfluenceIndexStale": "the job's version is scoped to its context; the index stays on the global v1",
}
# ... and the one alert that must have data: the untrained tiny model serves a BER near 0.5
EXPECTED_ALERTS = {"DeepRxContextBerHigh"}
TOKEN = "test-admin-token"
CONTEXTS = ("cell-a", "cell-b", "cell-c")


# ------------------------------------------------------------------------------------------ tests
def test_prometheus_scrapes_the_service_and_evaluates_the_rules(tmp_path, server, channel, train_mix_file):
    slots, _ = read_slots(train_mix_file)
    with _prometheus(tmp_path, server.metrics_port) as port:
        # two rounds of feedback a few scrapes apart, so rates see the counters increase
        for part in (slice(0, 8), slice(8, 16)):
            stream_slots(address_of(server), slots.select(part), "prom-cell", prefix=f"p{part.start}")
            send_genie_feedback(channel, slots.select(part), prefix=f"p{part.start}")
            time.sleep(3)
        assert _poll(port, 'deeprx_slots_total{outcome="ok"}', lambda r: float(r[0]["value"][1]) == 16.0)
        assert _poll(port, 'deeprx:context_ber:ratio_rate5m{context="prom-cell"}',
                     lambda r: 0 < float(r[0]["value"][1]) <= 1), "the recording rule computes per-context BER"


@pytest.fixture
def adapting_server(tmp_path, tiny_checkpoint, train_mix_file):
    """A server that adapts (random selection from a pool, a few steps, the gate accepts any result),
    with an admin token and room for one scoped version."""
    from service.config import ServerConfig
    from service.server import ReceiverServer

    config = ServerConfig(port=0, metrics_port=0)
    config.security.admin_token = TOKEN
    config.models.max_scoped = 1
    config.monitor.target_min_slots, config.monitor.target_absolute_ber = 16, 0.01
    a = config.adaptation
    a.pool = a.regression = str(train_mix_file)
    a.method, a.k, a.steps, a.min_target_slots = "random", 8, 5, 16
    a.min_relative_improvement, a.max_regression = -1.0, 1.0
    running = ReceiverServer(config, tmp_path / "store", tiny_checkpoint).start()
    yield running
    running.stop(grace=5)


def test_every_dashboard_and_rule_expression_runs_on_a_live_server(tmp_path, adapting_server, train_mix_file):
    """Traffic from several contexts, genie feedback, rejected admin calls and one accepted adaptation
    job; then each dashboard and rule expression must parse, and all but ALLOWED_EMPTY show data."""
    from proto import receiver_pb2 as pb
    from proto import receiver_pb2_grpc as pb_grpc

    dashboard, rules = _dashboard_expressions(), _rule_expressions()
    expressions = {**dashboard, **rules}
    assert set(ALLOWED_EMPTY) <= set(expressions), set(ALLOWED_EMPTY) - set(expressions)
    slots, _ = read_slots(train_mix_file)
    admin = [("authorization", f"Bearer {TOKEN}")]
    with _prometheus(tmp_path, adapting_server.metrics_port) as port, \
            grpc.insecure_channel(f"127.0.0.1:{adapting_server.port}") as channel:
        stub = pb_grpc.ReceiverStub(channel)
        served = 0
        for round_ in range(2):  # counters must rise between scrapes for rate() to see them
            for i, context in enumerate(CONTEXTS):
                part = slots.select(slice(24 * round_ + 8 * i, 24 * round_ + 8 * i + 8))
                report, _ = stream_slots(address_of(adapting_server), part, context, streams=2, prefix=f"{context}-{round_}")
                assert report.failures == 0
                send_genie_feedback(channel, part, prefix=f"{context}-{round_}")
                served += len(part)
            # feedback ends a round: a scrape that has all of it has the round's slots too
            assert _poll(port, f'sum(deeprx_feedback_total) == {served}', bool, 30), "scraped the round"
        assert [t.context for t in stub.ListTargets(pb.ListTargetsRequest()).contexts if t.is_target]  # sets the gauge
        for metadata, code in ((None, grpc.StatusCode.UNAUTHENTICATED),
                               ([("authorization", "Bearer wrong")], grpc.StatusCode.PERMISSION_DENIED)):
            with pytest.raises(grpc.RpcError) as err:
                stub.TriggerAdaptation(pb.AdaptationRequest(context="cell-a"), metadata=metadata)
            assert err.value.code() == code
        job = stub.TriggerAdaptation(pb.AdaptationRequest(context="cell-a"), metadata=admin)
        deadline = time.monotonic() + 120
        while (done := stub.GetAdaptation(pb.GetAdaptationRequest(job_id=job.job_id))).state in (
                pb.AdaptationJob.QUEUED, pb.AdaptationJob.RUNNING):
            assert time.monotonic() < deadline, "the adaptation job did not finish"
            time.sleep(0.2)
        assert done.state == pb.AdaptationJob.ACCEPTED and done.scope == "cell-a", done.message
        with pytest.raises(grpc.RpcError) as err:  # cell-a holds the one scoped version allowed
            stub.ActivateModel(pb.ActivateModelRequest(version="v1", context="cell-b"), metadata=admin)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        must_show = {name for name in expressions if name not in ALLOWED_EMPTY}
        deadline, dark = time.monotonic() + 60, must_show
        while dark and time.monotonic() < deadline:
            time.sleep(1)
            answers = {name: _query(port, expr) for name, expr in expressions.items()}
            failed = {name: a for name, a in answers.items() if a.get("status") != "success"}
            assert not failed, f"expressions Prometheus refuses: {failed}"
            dark = {name for name in must_show if not _lit(answers[name])}
        assert not dark, "no data for: " + "; ".join(f"{name}: {expressions[name]}" for name in sorted(dark))

        firing = {name.removeprefix("alert ") for name, a in answers.items() if name.startswith("alert ") and _lit(a)}
        assert EXPECTED_ALERTS <= firing
        groups = _api(port, "/api/v1/rules")["data"]["groups"]
        evaluated = [rule for group in groups for rule in group["rules"]]
        assert len(evaluated) == len(_rules()) and all(rule["health"] == "ok" for rule in evaluated), \
            [(rule["name"], rule.get("lastError")) for rule in evaluated if rule["health"] != "ok"]
        alerts = _api(port, "/api/v1/alerts")["data"]["alerts"]
        assert {a["labels"]["context"] for a in alerts if a["labels"]["alertname"] == "DeepRxContextBerHigh"} \
            == set(CONTEXTS), "pending for each context (for: 5m)"
        print(f"\n{len(dashboard)} dashboard and {len(rules)} rule expressions checked; "
              f"{len(must_show)} showed data, {len(ALLOWED_EMPTY)} allowed empty, of which "
              f"{sorted(name for name in ALLOWED_EMPTY if _lit(answers[name]))} had data")
