"""Versions scoped to contexts: routing, persistence across restarts, the bound, the RPCs."""
import grpc
import pytest
import torch

from proto import receiver_pb2 as pb
from proto import receiver_pb2_grpc as pb_grpc
from service.receiver.model import DeepRx, config_for
from service.serving.registry import ModelRegistry, ScopeLimitError


def _registry(root, max_scoped: int = 2) -> tuple[ModelRegistry, list[str]]:
    registry = ModelRegistry(root, max_scoped=max_scoped)
    names = []
    for seed in range(3):
        torch.manual_seed(seed)
        names.append(registry.publish(DeepRx(config_for("tiny")).eval(), creator=f"seed {seed}"))
    registry.activate(names[0])
    return registry, names


def test_a_context_is_served_by_its_scope_else_by_the_global_version(tmp_path):
    registry, (v1, v2, v3) = _registry(tmp_path)
    registry.activate(v2, "cell-7")
    assert registry.active_for("cell-7").version == v2
    assert registry.active_for("cell-8").version == v1
    registry.activate(v3)  # a new global version leaves the scope alone
    assert registry.active_for("cell-7").version == v2 and registry.active_for("cell-8").version == v3
    assert registry.release("cell-7") and not registry.release("cell-7")
    assert registry.active_for("cell-7").version == v3


def test_restart_keeps_the_global_version_and_every_scope(tmp_path):
    registry, (v1, v2, v3) = _registry(tmp_path)
    registry.activate(v2, "cell-7")
    registry.activate(v3, "beam-2")
    reopened = ModelRegistry(tmp_path)
    assert reopened.active.version == v1
    assert reopened.scopes() == {"cell-7": v2, "beam-2": v3}


def test_the_scope_bound_refuses_one_more_context_and_changes_nothing(tmp_path):
    registry, (v1, v2, v3) = _registry(tmp_path, max_scoped=2)
    registry.activate(v2, "a")
    registry.activate(v3, "b")
    registry.activate(v3, "a")  # replacing an existing scope is not one more
    with pytest.raises(ScopeLimitError, match="max_scoped = 2"):
        registry.activate(v2, "c")
    assert registry.scopes() == {"a": v3, "b": v3}
    assert ModelRegistry(tmp_path).scopes() == {"a": v3, "b": v3}


def test_listeners_hear_scoped_activations_and_releases(tmp_path):
    registry, (v1, v2, _) = _registry(tmp_path)
    heard = []
    registry.on_activate(lambda a: heard.append((a.context, a.version.version if a.version else None)))
    registry.activate(v2, "cell-7")
    registry.activate(v2, "cell-7")  # no change, no announcement
    registry.release("cell-7")
    assert heard == [("cell-7", v2), ("cell-7", None)]


def test_scope_rpcs(server, channel):
    stub = pb_grpc.ReceiverStub(channel)
    torch.manual_seed(9)
    v2 = server.registry.publish(DeepRx(config_for("tiny")).eval(), creator="test")
    info = stub.ActivateModel(pb.ActivateModelRequest(version=v2, context="cell-7"))
    assert info.scoped_contexts == ["cell-7"] and not info.active
    assert stub.GetModel(pb.GetModelRequest(context="cell-7")).version == v2
    assert stub.GetModel(pb.GetModelRequest(context="cell-8")).version == "v1"
    assert dict(stub.ListModels(pb.ListModelsRequest()).scoped_versions) == {"cell-7": v2}
    released = stub.ReleaseScope(pb.ReleaseScopeRequest(context="cell-7"))
    assert released.released and released.serving_version == "v1"
    assert not stub.ReleaseScope(pb.ReleaseScopeRequest(context="cell-7")).released
    for bad in (pb.ActivateModelRequest(version=v2, context="x" * 200), pb.ReleaseScopeRequest(context="")):
        with pytest.raises(grpc.RpcError) as err:
            (stub.ActivateModel if isinstance(bad, pb.ActivateModelRequest) else stub.ReleaseScope)(bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "context" in err.value.details()
    server.registry.max_scoped = 1
    stub.ActivateModel(pb.ActivateModelRequest(version=v2, context="a"))
    with pytest.raises(grpc.RpcError) as err:
        stub.ActivateModel(pb.ActivateModelRequest(version=v2, context="b"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "max_scoped = 1" in err.value.details()


def test_client_scopes_and_releases_a_context(server, capsys):
    from client.cli import main as client_main

    torch.manual_seed(9)
    v2 = server.registry.publish(DeepRx(config_for("tiny")).eval(), creator="test")
    address = ["--server", f"127.0.0.1:{server.port}"]
    assert client_main(["activate", *address, "--version", v2, "--context", "cell-7"]) == 0
    assert server.registry.active_for("cell-7").version == v2 and server.registry.active.version == "v1"
    assert client_main(["models", *address]) == 0
    assert "cell-7" in capsys.readouterr().out
    assert client_main(["release", *address, "--context", "cell-7"]) == 0
    assert "served by v1" in capsys.readouterr().out
    assert server.registry.active_for("cell-7").version == "v1"
