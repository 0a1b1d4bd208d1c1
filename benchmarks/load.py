"""Load run: N concurrent streams for T seconds against one server with capture and feedback on.

The server runs as its own process on 127.0.0.1 (``deeprx-service serve``); each stream sends slots in
a closed loop (``--window`` in flight) until the time is up and reports genie feedback for what came
back. Every slot sent is counted once: answered; rejected (its stream ended with RESOURCE_EXHAUSTED or
UNAVAILABLE: the server said no); or lost (anything else, which must not happen). The server's
resident memory is sampled every second; it levels off when the last sixth of the run grows by less
than ``--rss-tolerance``. The server keeps the hard decisions of its last 100,000 served slots for
feedback (``monitor.served_slots_memory``), so its memory grows until that fills (about 155 s at 650
slots/s) and a run must outlast that to show it flat. Bounded in time, loopback only.

    .venv/bin/python benchmarks/load.py --model models/small --data data/train-heldout.h5 \\
        --streams 16 --seconds 180 --json docs/load-run.json --plot docs/load-run.png
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serving import _free_port, _wait_healthy  # noqa: E402
from client.connection import Endpoint  # noqa: E402
from client.stream import genie_feedback, slot_message, writing  # noqa: E402
from proto import receiver_pb2 as pb  # noqa: E402
from proto import receiver_pb2_grpc as pb_grpc  # noqa: E402
from schema.dataset import SlotBatch, read_slots  # noqa: E402

REJECTED = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)


@dataclass
class LoadReport:
    streams: int
    seconds: float
    sent: int = 0
    answered: int = 0
    rejected: int = 0
    lost: int = 0
    feedback_accepted: int = 0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    rss_mib: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def rss_growth_last_sixth(self) -> float:
        """Relative growth of resident memory over the last sixth of the run (0 without samples)."""
        tail = self.rss_mib[len(self.rss_mib) * 5 // 6:]
        return (max(tail) - tail[0]) / tail[0] if len(tail) > 1 else 0.0

    def summary(self) -> dict:
        latencies = np.asarray(self.latencies_ms or [np.nan])
        return {**{k: v for k, v in asdict(self).items() if k not in ("latencies_ms", "rss_mib")},
                "slots_per_second": round(self.answered / self.seconds, 1),
                "latency_ms": {name: round(float(np.percentile(latencies, q)), 2)
                               for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
                "rss_mib_first_last_peak": [round(v, 1) for v in (self.rss_mib[0], self.rss_mib[-1],
                                                                  max(self.rss_mib))] if self.rss_mib else [],
                "rss_growth_last_sixth": round(self.rss_growth_last_sixth(), 4)}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ProcessLookupError(pid)


def run_load(address: str, slots: SlotBatch, streams: int, seconds: float, window: int = 8,
             server_pid: int | None = None, feedback_every: int = 32) -> LoadReport:
    """Drive ``streams`` closed-loop streams at ``address`` for ``seconds``, reporting genie feedback
    every ``feedback_every`` answers. Every stream is a task on one asyncio event loop, as in
    ``client.stream.stream_slots`` (threads per stream took the service's cores from it)."""
    report = LoadReport(streams, seconds)
    stop_at = time.perf_counter() + seconds

    async def stream(index: int, stub: pb_grpc.ReceiverStub) -> None:
        in_flight = asyncio.Semaphore(window)
        sent: dict[str, tuple[int, float]] = {}
        pending_feedback: list[pb.Feedback] = []

        call = stub.StreamDetect()

        async def send() -> None:
            n = 0
            while time.perf_counter() < stop_at:
                try:  # an answer that never comes ends the stream instead of waiting forever
                    await asyncio.wait_for(in_flight.acquire(), timeout=30)
                except TimeoutError:
                    break
                if time.perf_counter() >= stop_at:
                    break
                row = (index * 7919 + n) % len(slots)
                slot_id = f"s{index}-{n}"
                sent[slot_id] = (row, time.perf_counter())
                n += 1
                await call.write(pb.StreamDetectRequest(slot=slot_message(slots, row, slot_id, f"load-{index % 4}")))
            await call.done_writing()

        async def send_feedback() -> None:
            response = await stub.ReportFeedback(pb.ReportFeedbackRequest(feedback=pending_feedback))
            report.feedback_accepted += response.accepted
            pending_feedback.clear()

        answered, outcome = 0, None
        try:
            async with writing(call, send()):
                async for result in call:
                    in_flight.release()
                    row, at = sent[result.slot_id]
                    answered += 1
                    report.latencies_ms.append((time.perf_counter() - at) * 1000)
                    pending_feedback.append(genie_feedback(slots, row, result.slot_id))
                    if len(pending_feedback) >= feedback_every:
                        await send_feedback()
            if pending_feedback:
                await send_feedback()
        except grpc.RpcError as err:
            outcome = err
        report.sent += len(sent)
        report.answered += answered
        unanswered = len(sent) - answered
        if outcome is not None and outcome.code() in REJECTED:
            report.rejected += unanswered
        else:
            report.lost += unanswered
            if outcome is not None:
                report.errors.append(f"{outcome.code().name}: {outcome.details()}")

    async def sample_memory(done: asyncio.Event) -> None:
        while server_pid is not None and not done.is_set():
            report.rss_mib.append(rss_mib(server_pid))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout=1.0)

    async def run_all() -> None:
        done = asyncio.Event()
        sampler = asyncio.create_task(sample_memory(done))
        async with Endpoint(address).aio_channel() as channel:
            stub = pb_grpc.ReceiverStub(channel)
            await asyncio.gather(*(stream(i, stub) for i in range(streams)))
        done.set()
        await sampler

    asyncio.run(run_all())
    return report


def plot(report: LoadReport, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (memory, latency) = plt.subplots(1, 2, figsize=(10, 3.5))
    memory.plot(np.arange(len(report.rss_mib)), report.rss_mib)
    memory.set_xlabel("seconds")
    memory.set_ylabel("server resident memory [MiB]")
    memory.set_ylim(0, max(report.rss_mib) * 1.1)
    latency.hist(report.latencies_ms, bins=60)
    latency.set_xlabel("round-trip latency per slot [ms]")
    latency.set_ylabel("slots")
    s = report.summary()
    fig.suptitle(f"{report.streams} streams x {report.seconds:g} s: {s['slots_per_second']} slots/s, "
                 f"{report.answered} answered, {report.rejected} rejected, {report.lost} lost", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "small")
    parser.add_argument("--data", type=Path, required=True, help="HDF5 slots to send (cycled)")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=180.0,
                        help="run length; memory levels off once the server's feedback memory has filled")
    parser.add_argument("--window", type=int, default=8, help="slots in flight per stream")
    parser.add_argument("--slots", type=int, default=512, help="distinct slots read from --data")
    parser.add_argument("--rss-tolerance", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=None, help="server torch/ONNX Runtime threads")
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--plot", type=Path, help="write memory and latency plots (PNG) here")
    args = parser.parse_args(argv)

    slots, _ = read_slots(args.data, slice(0, args.slots))
    port, metrics_port = _free_port(), _free_port()
    with tempfile.TemporaryDirectory() as store:
        command = [str(ROOT / ".venv" / "bin" / "deeprx-service")]
        command += ["--threads", str(args.threads)] if args.threads else []
        command += ["serve", "--model", str(args.model), "--store", store, "--port", str(port),
                    "--metrics-port", str(metrics_port)]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        try:
            _wait_healthy(port)
            report = run_load(f"127.0.0.1:{port}", slots, args.streams, args.seconds, args.window, server.pid)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
    summary = report.summary()
    summary["rss_levels_off"] = report.rss_growth_last_sixth() < args.rss_tolerance
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0 if report.lost == 0 and summary["rss_levels_off"] else 1


if __name__ == "__main__":
    sys.exit(main())
