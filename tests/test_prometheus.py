"""A real Prometheus (Debian's package) scrapes a real server with the deploy/ rules loaded."""
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote
from urllib.request import urlopen

import pytest

from client.stream import send_genie_feedback, stream_slots
from schema.dataset import read_slots

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"


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


def _query(port: int, expression: str) -> list:
    with urlopen(f"http://127.0.0.1:{port}/api/v1/query?query={quote(expression)}", timeout=5) as response:
        return json.load(response)["data"]["result"]


def test_prometheus_scrapes_the_service_and_evaluates_the_rules(tmp_path, server, channel, train_mix_file):
    prometheus = _require("prometheus")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    shutil.copy(DEPLOY / "rules.yml", tmp_path / "rules.yml")
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\nrule_files: [rules.yml]\n"
        f"scrape_configs:\n  - job_name: deeprx\n    static_configs: [{{targets: ['127.0.0.1:{server.metrics_port}']}}]\n")
    process = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def poll(expression: str, accept, seconds: float = 60) -> list:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                result = _query(port, expression)
                if result and accept(float(result[0]["value"][1])):
                    return result
            except OSError:
                pass
            time.sleep(0.5)
        return []

    try:
        slots, _ = read_slots(train_mix_file)
        assert poll('up{job="deeprx"}', lambda v: v == 1), "Prometheus scrapes the service"
        # two rounds of feedback a few scrapes apart, so rates see the counters increase
        for part in (slice(0, 8), slice(8, 16)):
            stream_slots(channel, slots.select(part), "prom-cell", prefix=f"p{part.start}")
            send_genie_feedback(channel, slots.select(part), prefix=f"p{part.start}")
            time.sleep(3)
        assert poll('deeprx_slots_total{outcome="ok"}', lambda v: v == 16.0)
        assert poll('deeprx:context_ber:ratio_rate5m{context="prom-cell"}', lambda v: 0 < v <= 1), \
            "the recording rule computes per-context BER"
    finally:
        process.terminate()
        process.wait(timeout=30)
