"""Serving benchmark: streamed slots/s and latency of the receiver service vs a bare gRPC echo.

Both servers run as separate processes on 127.0.0.1 and receive the same Slot messages; the echo
answers each with a SlotResult of the same LLR payload size without decoding, featurizing or
running a model, so service / echo is the cost of the service itself.

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


def measure(port: int, slots, streams: int, window: int) -> dict:
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        stream_slots(ch, slots.select(slice(0, 2 * streams)), "warmup", streams=streams, prefix="warm")
        report, _ = stream_slots(ch, slots, "bench", streams=streams, window=window, prefix=f"s{streams}")
    return {"slots_per_second": report.slots / report.seconds, "p50_ms": report.percentile_ms(50),
            "p99_ms": report.percentile_ms(99), "failures": report.failures}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "small")
    parser.add_argument("--data", type=Path, required=True, help="HDF5 slots to stream")
    parser.add_argument("--slots", type=int, default=480)
    parser.add_argument("--streams", default="1,4,16", help="comma-separated concurrent stream counts")
    parser.add_argument("--window", type=int, default=2, help="slots in flight per stream")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--echo-server", type=int, help=argparse.SUPPRESS)  # internal: run the echo server
    args = parser.parse_args()
    if args.echo_server:
        run_echo_server(args.echo_server)
        return 0

    slots, _ = read_slots(args.data)
    slots = slots.select(slice(0, args.slots))
    service_port, echo_port = _free_port(), _free_port()
    store = tempfile.mkdtemp(prefix="deeprx-bench-")
    servers = [
        subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--model", str(args.model), "--store", store,
                          "--port", str(service_port), "--metrics-port", "0"], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, __file__, "--data", str(args.data), "--echo-server", str(echo_port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    try:
        _wait_healthy(service_port)
        _wait_healthy(echo_port)
        rows = []
        for streams in map(int, args.streams.split(",")):
            service = measure(service_port, slots, streams, args.window)
            echo = measure(echo_port, slots, streams, args.window)
            rows.append({"streams": streams, "service": service, "echo": echo,
                         "throughput_ratio": echo["slots_per_second"] / service["slots_per_second"]})
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)
    result = {"slots": len(slots), "window": args.window, "cpu_count": os.cpu_count(), "rows": rows,
              "model": str(args.model)}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{len(slots)} slots per run, {args.window} in flight per stream, {os.cpu_count()} CPUs, model {args.model}")
    print(f"{'streams':>7} | {'service slots/s':>15} {'p50 ms':>7} {'p99 ms':>7} | {'echo slots/s':>12} "
          f"{'p50 ms':>7} {'p99 ms':>7} | echo/service")
    for r in rows:
        s, e = r["service"], r["echo"]
        print(f"{r['streams']:>7} | {s['slots_per_second']:>15.1f} {s['p50_ms']:>7.2f} {s['p99_ms']:>7.2f} | "
              f"{e['slots_per_second']:>12.1f} {e['p50_ms']:>7.2f} {e['p99_ms']:>7.2f} | {r['throughput_ratio']:>6.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
