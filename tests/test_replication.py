"""Two replicas on 127.0.0.1 sharing a registry: the follower serves what the leader activates."""
import socket
import time

import grpc

from proto import receiver_pb2 as pb
from proto import receiver_pb2_grpc as pb_grpc
from service.config import ServerConfig
from service.server import ReceiverServer


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
