"""kill -9 during capture and during version writes: the store and registry stay consistent."""
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import grpc
import pytest

from client.stream import stream_slots
from proto import receiver_pb2 as pb
from proto import receiver_pb2_grpc as pb_grpc
from schema.dataset import read_slots
from service.serving.registry import ModelRegistry
from tests.conftest import serve_process

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_kill_during_capture_and_restart_serves_last_active_version(tmp_path, tiny_checkpoint, train_mix_file):
    store = tmp_path / "store"
    slots, _ = read_slots(train_mix_file)
    process, port = serve_process(store, tiny_checkpoint)
    v2 = ModelRegistry(store / "models").import_checkpoint(tiny_checkpoint, creator="crash test")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        pb_grpc.ReceiverStub(channel).ActivateModel(pb.ActivateModelRequest(version=v2))
        streaming = threading.Thread(target=lambda: _stream_until_killed(f"127.0.0.1:{port}", slots))
        streaming.start()
        time.sleep(1.5)  # capture is writing now
        process.send_signal(signal.SIGKILL)
        process.wait()
        streaming.join()

    db = sqlite3.connect(store / "samples" / "samples.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    captured = db.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
    db.close()
    assert captured > 0

    process, port = serve_process(store)  # no --model: resumes from the registry
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert pb_grpc.ReceiverStub(channel).GetModel(pb.GetModelRequest()).version == v2
            report, _ = stream_slots(f"127.0.0.1:{port}", slots.select(slice(0, 8)), "after", prefix="after")
            assert report.versions == {v2: 8}
    finally:
        process.terminate()
        process.wait(timeout=30)


def _stream_until_killed(address: str, slots) -> None:
    for round_ in range(1000):
        try:
            stream_slots(address, slots, "crash", streams=2, prefix=f"r{round_}")
        except grpc.RpcError:
            return


PUBLISH_LOOP = """
import sys, torch
from service.receiver.model import DeepRx, config_for
from service.serving.registry import ModelRegistry
from tests.conftest import serve_process
registry = ModelRegistry(sys.argv[1])
model = DeepRx(config_for("small")).eval()
print("ready", flush=True)
while True:
    registry.activate(registry.publish(model, creator="loop"))
"""


@pytest.mark.parametrize("delay", [0.13, 0.29, 0.47, 0.61])
def test_kill_during_version_writes_leaves_only_complete_versions(tmp_path, delay):
    root = tmp_path / "registry"
    process = subprocess.Popen([sys.executable, "-c", PUBLISH_LOOP, str(root)], env=ENV, stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "ready"
    time.sleep(delay)  # versions are being written back to back now
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_write = bool(list(root.glob(".tmp-*")))
    registry = ModelRegistry(root)
    assert not list(root.glob(".tmp-*")), "partial versions are cleaned up"
    for version in registry.versions():
        registry.load(version)  # every listed version is complete and loadable
    listed = registry.versions()
    assert listed or interrupted_write, "the kill came while versions were being written"
    if (root / "ACTIVE").exists():
        assert registry.active is not None and registry.active.version in listed
