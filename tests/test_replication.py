"""Two replicas on 127.0.0.1 sharing a registry: the follower serves what the leader activates, and
refuses a version whose weights differ from the leader's."""
import shutil
import socket
import time

import grpc

from proto import receiver_pb2 as pb
from proto import receiver_pb2_grpc as pb_grpc
from service.config import ServerConfig
from service.server import ReceiverServer
from service.serving.replication import WEIGHTS_FILE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_follower_activates_what_the_leader_announces(tmp_path, tiny_checkpoint):
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    registry = str(tmp_path / "shared-registry")
    leader_config = ServerConfig(port=0, metrics_port=0)
    leader_config.replication.registry, leader_config.replication.publish = registry, endpoint
    leader = ReceiverServer(leader_config, tmp_path / "leader", tiny_checkpoint).start()
    follower_config = ServerConfig(port=0, metrics_port=0)
    follower_config.replication.registry, follower_config.replication.follow = registry, endpoint
    follower = ReceiverServer(follower_config, tmp_path / "follower").start()  # no --model: shared registry
    try:
        v2 = leader.registry.import_checkpoint(tiny_checkpoint, creator="test")
        with grpc.insecure_channel(f"127.0.0.1:{leader.port}") as lc, \
                grpc.insecure_channel(f"127.0.0.1:{follower.port}") as fc:
            leader_stub, follower_stub = pb_grpc.ReceiverStub(lc), pb_grpc.ReceiverStub(fc)
            deadline = time.monotonic() + 10
            # PUB/SUB drops messages until the subscription is established: activate until it lands
            while follower_stub.GetModel(pb.GetModelRequest()).version != v2 and time.monotonic() < deadline:
                leader_stub.ActivateModel(pb.ActivateModelRequest(version="v1"))
                leader_stub.ActivateModel(pb.ActivateModelRequest(version=v2))
                time.sleep(0.3)
            assert follower_stub.GetModel(pb.GetModelRequest()).version == v2
            leader_stub.ActivateModel(pb.ActivateModelRequest(version="v1"))
            deadline = time.monotonic() + 5
            while follower_stub.GetModel(pb.GetModelRequest()).version != "v1" and time.monotonic() < deadline:
                time.sleep(0.1)
            assert follower_stub.GetModel(pb.GetModelRequest()).version == "v1", "rollbacks propagate too"
    finally:
        follower.stop(grace=1)
        leader.stop(grace=1)


def test_follower_refuses_weights_that_differ_from_the_leaders(tmp_path, tiny_checkpoint):
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    leader_config = ServerConfig(port=0, metrics_port=0)
    leader_config.replication.registry, leader_config.replication.publish = str(tmp_path / "leader-registry"), endpoint
    leader = ReceiverServer(leader_config, tmp_path / "leader", tiny_checkpoint).start()
    tampered = leader.registry.import_checkpoint(tiny_checkpoint, creator="test")
    intact = leader.registry.import_checkpoint(tiny_checkpoint, creator="test")
    for version in (tampered, intact):  # built now: two ONNX exports at once in one process fail
        leader.registry.load(version)
    # the follower's own copy of the registry, as on a volume synced from the leader's, with one version's
    # weights changed in their last byte (tensor data: the file still loads, so only the digest can tell)
    shutil.copytree(tmp_path / "leader-registry", tmp_path / "follower-registry")
    weights = tmp_path / "follower-registry" / "versions" / tampered / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    follower_config = ServerConfig(port=0, metrics_port=0)
    follower_config.replication.registry = str(tmp_path / "follower-registry")
    follower_config.replication.follow = endpoint
    follower = ReceiverServer(follower_config, tmp_path / "follower").start()
    activated = []
    follower.registry.on_activate(lambda activation: activated.append(activation.version.version))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{leader.port}") as lc, \
                grpc.insecure_channel(f"127.0.0.1:{follower.port}") as fc:
            leader_stub, follower_stub = pb_grpc.ReceiverStub(lc), pb_grpc.ReceiverStub(fc)
            deadline = time.monotonic() + 10
            # PUB/SUB drops messages until the subscription is established: announce both until the
            # follower has seen the tampered one and followed the intact one
            while ((follower_stub.GetModel(pb.GetModelRequest()).version != intact or follower.follower.refused == 0)
                   and time.monotonic() < deadline):
                leader_stub.ActivateModel(pb.ActivateModelRequest(version=tampered))
                leader_stub.ActivateModel(pb.ActivateModelRequest(version=intact))
                time.sleep(0.3)
            assert follower_stub.GetModel(pb.GetModelRequest()).version == intact
            assert tampered not in activated, "the tampered copy is never served"
            assert follower.follower.refused > 0
    finally:
        follower.stop(grace=1)
        leader.stop(grace=1)
