"""Shared fixtures: small simulated datasets, made once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

from client.cli import main as client_main

HIGH_SNR_SPEC = "channel=TDL-C,delay_spread=100,speed=0:10,snr=25:30,dmrs=1,mod=qpsk"


def simulate(path: Path, spec: str, slots: int, seed: int = 0) -> Path:
    assert client_main(["simulate", "--scenario", spec, "--slots", str(slots), "--seed", str(seed),
                        "--out", str(path), "--quiet"]) == 0
    return path


@pytest.fixture(scope="session")
def train_mix_file(tmp_path_factory) -> Path:
    """64 slots of the training mix."""
    return simulate(tmp_path_factory.mktemp("data") / "train-mix.h5", "train", 64, seed=3)


@pytest.fixture(scope="session")
def high_snr_file(tmp_path_factory) -> Path:
    """96 easy QPSK slots at high SNR: a dataset a tiny model can learn in seconds."""
    return simulate(tmp_path_factory.mktemp("data") / "high-snr.h5", HIGH_SNR_SPEC, 96, seed=4)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny DeepRx (2 rx antennas), seeded: any fixed model will do for serving tests."""
    import torch

    from service.receiver.checkpoint import save_checkpoint
    from service.receiver.model import DeepRx, config_for

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny"
    save_checkpoint(path, DeepRx(config_for("tiny")).eval(), {"size": "tiny", "steps": 0})
    return path


@pytest.fixture(scope="session")
def trained_tiny_checkpoint(tmp_path_factory, train_mix_file) -> Path:
    """A tiny DeepRx trained briefly on the training mix: near an optimum of the pool's distribution,
    so influence finds both helpful and harmful slots, and an unseen drift condition is a weak spot."""
    from service.receiver.train import TrainConfig, train

    out = tmp_path_factory.mktemp("trained") / "tiny"
    train(train_mix_file, out, TrainConfig(size="tiny", steps=300, batch_size=16, learning_rate=1e-2,
                                           warmup_steps=10, validation_slots=8, checkpoint_every=300),
          progress=False)
    return out


@pytest.fixture
def server(tmp_path, tiny_checkpoint):
    """A real server on 127.0.0.1 with free ports, stopped after the test."""
    from service.config import ServerConfig
    from service.server import ReceiverServer

    running = ReceiverServer(ServerConfig(port=0, metrics_port=0), tmp_path / "store", tiny_checkpoint).start()
    yield running
    running.stop(grace=2)


@pytest.fixture
def channel(server):
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


def address_of(server) -> str:
    """The loopback address a test server listens on (what ``stream_slots`` streams to)."""
    return f"127.0.0.1:{server.port}"


def scrape(port: int) -> str:
    from urllib.request import urlopen

    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_process(store: Path, model: Path | None = None, *extra: str):
    """``deeprx-service serve`` as a child process on 127.0.0.1 (one thread), once it is healthy:
    for tests that kill it. Returns (process, gRPC port)."""
    import os
    import subprocess
    import sys
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = free_port()
    args = [sys.executable, "-m", "service.cli", "--threads", "1", "serve", "--store", str(store),
            "--port", str(port), "--metrics-port", "0", *extra]
    if model is not None:
        args += ["--model", str(model)]
    process = subprocess.Popen(args, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return process, port
            except grpc.RpcError:
                time.sleep(0.2)
    process.kill()
    raise TimeoutError("server did not become healthy")
