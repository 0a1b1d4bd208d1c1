"""Serving benchmark, side by side in one run: the inference backends alone, the receiver service
on each backend, and a bare gRPC echo.

Backends alone: the model's forward pass on the same featurized batches (sizes ``--batches``) with
eager PyTorch and with ONNX Runtime, in this process, once in every round before the servers' turns
(the servers idle meanwhile): slots/s, latency per batch and the largest LLR difference, medians over
the rounds; and the service's share of ONNX Runtime alone at batch 16, taken round by round. Servers
run as separate processes on 127.0.0.1 and receive the same Slot messages; the echo answers each
with a SlotResult of the same LLR payload size without decoding, featurizing or running a model, so
service / echo is the cost of the service.
"server p50" is the service's own arrival-to-result time (SlotResult.server_latency_seconds). Each
server is streamed to ``--rounds`` times per stream count, the servers taking turns in rotating order
(this VM's speed drifts between runs); the tables show medians, and the range of slots/s.

CPU per slot: the CPU seconds the server process and this process (the client) spent while a run's
slots streamed, divided by its slots (the client scores the answers afterwards, uncounted). Server
and client share this machine's cores, so ``cores / (server + client CPU per slot)`` is the most
slots/s the pair could answer if every core were always busy: a service row below that bound waits
(on the GIL, on thread hand-offs), a row at it needs less CPU per slot.

    .venv/bin/python benchmarks/serving.py --model models/small --data data/train-heldout.h5 --slots 480
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.stream import stream_slots  # noqa: E402
from proto import codec  # noqa: E402
from proto import receiver_pb2 as pb  # noqa: E402
from proto import receiver_pb2_grpc as pb_grpc  # noqa: E402
from schema.dataset import read_slots  # noqa: E402
from service.receiver.checkpoint import load_checkpoint  # noqa: E402
from service.receiver.features import prepare  # noqa: E402
from service.serving.backend import OnnxRuntimeBackend, TorchBackend  # noqa: E402


class EchoReceiver(pb_grpc.ReceiverServicer):
    """StreamDetect that answers every slot with an LLR tensor of its real size (data REs x bits),
    without decoding the grid: the size comes from counting the data-mask bytes."""

    def __init__(self):
        self._payloads: dict[tuple[int, int], pb.Tensor] = {}

    def StreamDetect(self, request_iterator, context):
        for request in request_iterator:
            key = (request.slot.data_mask.data.count(1), request.slot.modulation)
            if key not in self._payloads:
                self._payloads[key] = codec.encode(np.zeros(key, np.float32))
            yield pb.SlotResult(slot_id=request.slot.slot_id, llrs=self._payloads[key], model_version="echo")


def run_echo_server(port: int) -> None:
    from grpc_health.v1 import health

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64),
                         options=[("grpc.max_receive_message_length", 64 << 20)])
    pb_grpc.add_ReceiverServicer_to_server(EchoReceiver(), server)
    checker = health.HealthServicer()
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(port: int, timeout: float = 120) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.3)
    raise TimeoutError(f"no healthy server on port {port}")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, all threads (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(port: int, server_pid: int, slots, streams: int, window: int) -> dict:
    address = f"127.0.0.1:{port}"
    stream_slots(address, slots.select(slice(0, 2 * streams)), "warmup", streams=streams, prefix="warm")
    server_cpu = process_cpu_seconds(server_pid)
    report, _ = stream_slots(address, slots, "bench", streams=streams, window=window, prefix=f"s{streams}")
    server_cpu = process_cpu_seconds(server_pid) - server_cpu  # the server is idle once the last slot is back
    return {"slots_per_second": report.slots / report.seconds, "p50_ms": report.percentile_ms(50),
            "p99_ms": report.percentile_ms(99), "server_p50_ms": report.percentile_ms(50, server=True),
            "server_cpu_ms_per_slot": server_cpu / report.slots * 1e3,
            "client_cpu_ms_per_slot": report.cpu_seconds / report.slots * 1e3, "failures": report.failures}


def _median_run(runs: list[dict]) -> dict:
    """Each figure's median over a server's rounds, and the range of its slots/s."""
    median = {key: float(np.median([run[key] for run in runs])) for key in runs[0]}
    rates = [run["slots_per_second"] for run in runs]
    return {**median, "slots_per_second_range": [min(rates), max(rates)], "rounds": len(runs)}


def _time_backend(backend, features, bits_per_symbol, batch: int, repeats: int) -> tuple[float, list]:
    """Median seconds per batch of ``batch`` slots over ``repeats`` passes through every full batch."""
    starts = range(0, len(features) - batch + 1, batch)
    backend(features[:batch], bits_per_symbol[:batch])  # warm-up: first-call allocations and graph setup
    times, outputs = [], []
    for _ in range(repeats):
        for start in starts:
            t = time.perf_counter()
            outputs.append(backend(features[start:start + batch], bits_per_symbol[start:start + batch]))
            times.append(time.perf_counter() - t)
    return float(np.median(times)), outputs[:len(starts)]


def measure_backends(model_dir: Path, slots, batches: list[int], repeats: int, spinning: bool,
                     spin_between_runs: bool) -> Callable[[], list[dict]]:
    """Eager PyTorch vs ONNX Runtime on the same featurized batches (threads: each library's default;
    ONNX Runtime's spinning as the services run it): a function that times one round of every batch size."""
    model = load_checkpoint(model_dir).model.eval()
    data = prepare(slots)
    eager = TorchBackend(model)
    onnx = OnnxRuntimeBackend(model, spinning=spinning, spin_between_runs=spin_between_runs)

    def one_round() -> list[dict]:
        rows = []
        for batch in batches:
            eager_s, eager_out = _time_backend(eager, data.features, data.bits_per_symbol, batch, repeats)
            onnx_s, onnx_out = _time_backend(onnx, data.features, data.bits_per_symbol, batch, repeats)
            difference = max(float((a - b).abs().max()) for a, b in zip(eager_out, onnx_out))
            rows.append({"batch": batch, "eager_ms": eager_s * 1e3, "onnxruntime_ms": onnx_s * 1e3,
                         "eager_slots_per_second": batch / eager_s, "onnxruntime_slots_per_second": batch / onnx_s,
                         "speedup": eager_s / onnx_s, "max_llr_difference": difference})
        return rows
    return one_round


def _median_backends(rounds: list[list[dict]]) -> list[dict]:
    """Each batch size's median over the rounds (the largest LLR difference of any round)."""
    rows = []
    for per_batch in zip(*rounds):
        row = {key: float(np.median([r[key] for r in per_batch])) for key in per_batch[0]}
        row.update(batch=per_batch[0]["batch"], max_llr_difference=max(r["max_llr_difference"] for r in per_batch),
                   speedup_range=[min(r["speedup"] for r in per_batch), max(r["speedup"] for r in per_batch)])
        rows.append(row)
    return rows


def start_service(model: Path, port: int, backend: str, max_queue_delay_ms: float | None,
                  spinning: bool, spin_between_runs: bool, threads: int = 0) -> subprocess.Popen:
    config = Path(tempfile.mkdtemp(prefix="deeprx-bench-")) / "serve.toml"
    batching = "" if max_queue_delay_ms is None else f"[batching]\nmax_queue_delay_ms = {max_queue_delay_ms}\n"
    config.write_text(f'[inference]\nbackend = "{backend}"\nspinning = {str(spinning).lower()}\nthreads = {threads}\n'
                      f'spin_between_runs = {str(spin_between_runs).lower()}\n{batching}')
    return subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--model", str(model),
                             "--store", str(config.parent / "store"), "--config", str(config),
                             "--port", str(port), "--metrics-port", "0"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "small")
    parser.add_argument("--data", type=Path, required=True, help="HDF5 slots to stream")
    parser.add_argument("--slots", type=int, default=480)
    parser.add_argument("--streams", default="1,4,16", help="comma-separated concurrent stream counts")
    parser.add_argument("--window", type=int, default=2, help="slots in flight per stream")
    parser.add_argument("--rounds", type=int, default=3,
                        help="streamed runs per server and stream count, servers in rotating order; medians are shown")
    parser.add_argument("--batches", default="1,16,64", help="batch sizes for the backends-alone rows")
    parser.add_argument("--repeats", type=int, default=1,
                        help="passes over the slots per backend, batch size and round")
    parser.add_argument("--service-backends", dest="service_backends", default="onnxruntime,torch",
                        help="inference.backend of each service run, comma-separated")
    parser.add_argument("--max-queue-delay-ms", dest="max_queue_delay_ms", type=float,
                        help="the services' batching.max_queue_delay_ms (default: the server's)")
    parser.add_argument("--no-spinning", dest="spinning", action="store_false",
                        help="ONNX Runtime's idle threads sleep instead of busy-waiting (inference.spinning = false)")
    parser.add_argument("--spin-between-runs", dest="spin_between_runs", action="store_true",
                        help="ONNX Runtime's threads also busy-wait between runs (inference.spin_between_runs = true)")
    parser.add_argument("--threads", type=int, default=0,
                        help="the services' inference.threads (ONNX Runtime intra-op threads; 0: one per core)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--echo-server", type=int, help=argparse.SUPPRESS)  # internal: run the echo server
    args = parser.parse_args()
    if args.echo_server:
        run_echo_server(args.echo_server)
        return 0

    slots, _ = read_slots(args.data)
    slots = slots.select(slice(0, args.slots))
    time_backends = measure_backends(args.model, slots, [int(b) for b in args.batches.split(",")], args.repeats,
                                     args.spinning, args.spin_between_runs)
    backend_rounds = []
    ports = {name: _free_port() for name in args.service_backends.split(",")}
    echo_port = _free_port()
    services = {name: start_service(args.model, port, name, args.max_queue_delay_ms, args.spinning,
                                    args.spin_between_runs, args.threads)
                for name, port in ports.items()}
    echo = subprocess.Popen([sys.executable, __file__, "--data", str(args.data), "--echo-server", str(echo_port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers = [*services.values(), echo]
    try:
        for port in [*ports.values(), echo_port]:
            _wait_healthy(port)
        targets = {"echo": (echo_port, echo.pid), **{name: (port, services[name].pid) for name, port in ports.items()}}
        runs: dict[tuple[int, str], list[dict]] = {}
        for round_ in range(args.rounds):  # the servers in turn, the order rotating, so drift hits them alike
            backend_rounds.append(time_backends())  # and the backends alone in every round, beside them
            order = list(targets)[round_ % len(targets):] + list(targets)[:round_ % len(targets)]
            for streams in map(int, args.streams.split(",")):
                for name in order:
                    runs.setdefault((streams, name), []).append(measure(*targets[name], slots, streams, args.window))
        rows = [{"streams": streams, **{name: _median_run(runs[streams, name]) for name in targets}}
                for streams in map(int, args.streams.split(","))]
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)
    backends = _median_backends(backend_rounds)
    shares = {}  # each round's service slots/s over that round's ONNX Runtime alone at batch 16: drift cancels
    if "onnxruntime" in ports and 16 in [b["batch"] for b in backends]:
        alone = [next(b for b in round_rows if b["batch"] == 16)["onnxruntime_slots_per_second"]
                 for round_rows in backend_rounds]
        shares = {streams: [run["slots_per_second"] / a for run, a in zip(runs[streams, "onnxruntime"], alone)]
                  for streams in map(int, args.streams.split(","))}
    result = {"slots": len(slots), "window": args.window, "cpu_count": os.cpu_count(), "backends": backends,
              "rows": rows, "model": str(args.model),
              "max_queue_delay_ms": args.max_queue_delay_ms, "spinning": args.spinning,
              "spin_between_runs": args.spin_between_runs, "threads": args.threads, "shares_of_backend_alone": shares}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{len(slots)} slots, model {args.model}, {os.cpu_count()} CPUs")
    print(f"\nbackends alone (same featurized batches), medians of {args.rounds} rounds")
    print(f"{'batch':>5} | {'eager ms':>9} {'slots/s':>8} | {'onnxruntime ms':>14} {'slots/s':>8} | "
          f"{'speedup':>7} {'range':>11} | max |dLLR|")
    for b in backends:
        print(f"{b['batch']:>5} | {b['eager_ms']:>9.2f} {b['eager_slots_per_second']:>8.0f} | "
              f"{b['onnxruntime_ms']:>14.2f} {b['onnxruntime_slots_per_second']:>8.0f} | {b['speedup']:>6.1f}x "
              f"{'({:.1f}-{:.1f})'.format(*b['speedup_range']):>11} | {b['max_llr_difference']:.1e}")
    print(f"\nstreamed, {args.window} in flight per stream, medians of {args.rounds} rounds "
          f"(client p50/p99; server p50 = arrival to result)")
    names = [*ports, "echo"]
    print(f"{'streams':>7} | " + " | ".join(f"{name + ' slots/s':>20} {'range':>11} {'p50':>6} {'p99':>6} {'srv p50':>7}"
                                             for name in names))
    for r in rows:
        print(f"{r['streams']:>7} | " + " | ".join(
            f"{r[n]['slots_per_second']:>20.1f} {'({:.0f}-{:.0f})'.format(*r[n]['slots_per_second_range']):>11} "
            f"{r[n]['p50_ms']:>6.1f} {r[n]['p99_ms']:>6.1f} {r[n]['server_p50_ms']:>7.2f}" for n in names))
    for streams, share in result["shares_of_backend_alone"].items():
        print(f"{streams:>7} streams: the onnxruntime service answers {np.median(share):.0%} "
              f"({min(share):.0%}-{max(share):.0%} in the rounds) of ONNX Runtime alone at batch 16 in the same round")
    cores = os.cpu_count() or 1
    print(f"\nCPU ms per slot (server + client) and the bound it sets on {cores} cores: cores / CPU per slot")
    print(f"{'streams':>7} | " + " | ".join(f"{name + ' server':>20} {'client':>6} {'bound/s':>7}" for name in names))
    for r in rows:
        print(f"{r['streams']:>7} | " + " | ".join(
            f"{r[n]['server_cpu_ms_per_slot']:>20.2f} {r[n]['client_cpu_ms_per_slot']:>6.2f} "
            f"{cores * 1e3 / (r[n]['server_cpu_ms_per_slot'] + r[n]['client_cpu_ms_per_slot']):>7.0f}"
            for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
