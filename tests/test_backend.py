"""Inference backends: ONNX Runtime serves the same LLRs as the PyTorch model, for every size and for
adapted versions; a version whose backend cannot be built is never activated."""
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from client.stream import stream_slots
from proto import codec
from proto import receiver_pb2 as pb
from proto import receiver_pb2_grpc as pb_grpc
from schema.dataset import read_slots
from service.adaptation.updates import UpdateConfig, fine_tune
from service.config import ServerConfig
from service.receiver.checkpoint import load_checkpoint
from service.receiver.features import featurize, prepare
from service.receiver.model import SIZES, DeepRx, config_for
from service.serving.backend import (
    BackendError,
    InferenceConfig,
    OnnxFeaturizer,
    OnnxRuntimeBackend,
    TorchBackend,
    build_backend,
)
from tests.conftest import address_of


@pytest.mark.parametrize("size,inputs", [(size, None) for size in sorted(SIZES)] + [("small", "weighted"), ("small", "robust")])
def test_onnxruntime_equals_torch_for_every_size(size, inputs, train_mix_file):
    data = prepare(read_slots(train_mix_file, slice(0, 8))[0])
    torch.manual_seed(0)
    model = DeepRx(config_for(size, inputs=inputs)).eval()
    if model.prior_weight is not None:  # LS-LMMSE's LLRs weighted differently on every RE (it starts at 0)
        with torch.no_grad():
            torch.nn.init.normal_(model.prior_weight.weight, std=0.5)
            torch.nn.init.constant_(model.prior_weight.bias, 0.3)
    expected = TorchBackend(model)(data.features, data.bits_per_symbol)
    got = OnnxRuntimeBackend(model)(data.features, data.bits_per_symbol)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spinning, between_runs", [(False, False), (True, False), (True, True)])
def test_inference_spinning_from_the_config_file_reaches_the_session(spinning, between_runs, tmp_path,
                                                                     train_mix_file):
    path = tmp_path / "server.toml"
    path.write_text(f"[inference]\nbackend = \"onnxruntime\"\nspinning = {str(spinning).lower()}\n"
                    f"spin_between_runs = {str(between_runs).lower()}\n")
    config = ServerConfig.from_toml(path).inference
    torch.manual_seed(0)
    model = DeepRx(config_for("tiny")).eval()
    backend = build_backend(model, config, torch.device("cpu"))
    options = backend.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spinning else "0")
    assert options.get_session_config_entry("session.force_spinning_stop") == ("0" if between_runs else "1")
    data = prepare(read_slots(train_mix_file, slice(0, 4))[0])
    torch.testing.assert_close(backend(data.features, data.bits_per_symbol),
                               TorchBackend(model)(data.features, data.bits_per_symbol), atol=1e-4, rtol=1e-4)


def test_the_onnx_featurizer_equals_the_torch_one(train_mix_file):
    """The server's featurizer (the per-layout arithmetic exported to ONNX) gives the training
    featurizer's features: both DMRS layouts in one batch, slots without a noise level, every QAM
    order, batches of one and many."""
    slots, _ = read_slots(train_mix_file, slice(0, 48))
    y, pilots = torch.from_numpy(slots.y), torch.from_numpy(slots.pilots)
    no = torch.from_numpy(10 ** (-slots.snr_db.astype(np.float32) / 10))
    no[::5] = 0  # unknown: estimated from the pilots
    k = torch.tensor([2, 4, 6])[torch.arange(48) % 3]  # the features need no labels
    assert len(set(slots.dmrs_additional_position.tolist())) > 1
    onnx = OnnxFeaturizer(InferenceConfig())
    for rows in (slice(0, 1), slice(5, 6), slice(0, 48)):
        expected = featurize(y[rows], pilots[rows], no[rows], k[rows])
        got = featurize(y[rows], pilots[rows], no[rows], k[rows], run_layout=onnx)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-3)  # LLR channels reach +-32


def test_a_featurizer_that_fails_to_export_falls_back_to_torch(train_mix_file, monkeypatch, caplog):
    """An export failure (an exporter bug, a new operator) costs speed, not slots: those slots are
    featurized in torch, and the failure is logged once, not retried per batch."""
    import service.serving.backend as backend

    def broken(*args, **kwargs):
        raise RuntimeError("exporter failure injected by the test")

    monkeypatch.setattr(backend, "_session", broken)
    slots, _ = read_slots(train_mix_file, slice(0, 4))
    y, pilots = torch.from_numpy(slots.y[:1]), torch.from_numpy(slots.pilots[:1])
    no, k = torch.tensor([0.1]), torch.tensor([4])
    onnx = OnnxFeaturizer(InferenceConfig())
    for _ in range(2):
        torch.testing.assert_close(featurize(y, pilots, no, k, run_layout=onnx), featurize(y, pilots, no, k))
    assert sum("exporting the featurizer" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("name", ["small", "full"])
def test_shipped_models_load_and_onnxruntime_serves_their_llrs(name, train_mix_file):
    checkpoint = load_checkpoint(Path(__file__).parents[1] / "models" / name)
    assert checkpoint.metadata["size"] == name and "recipe" in checkpoint.metadata
    data = prepare(read_slots(train_mix_file, slice(0, 4))[0])
    expected = TorchBackend(checkpoint.model)(data.features, data.bits_per_symbol)
    got = OnnxRuntimeBackend(checkpoint.model)(data.features, data.bits_per_symbol)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_served_llrs_of_an_adapted_version_equal_its_pytorch_model(server, channel, train_mix_file):
    slots, _ = read_slots(train_mix_file)
    data = prepare(slots)
    adapted = fine_tune(server.registry.load("v1").model, data[:32], UpdateConfig(method="target-only", steps=5,
                                                                                  learning_rate=1e-2))
    version = server.registry.publish(adapted, creator="test adaptation", parent="v1")
    assert server.registry.load(version).backend.name == "onnxruntime"
    pb_grpc.ReceiverStub(channel).ActivateModel(pb.ActivateModelRequest(version=version))
    results: list[pb.SlotResult] = []
    report, _ = stream_slots(address_of(server), slots.select(slice(32, 48)), "check", prefix="s", on_result=results.append)
    assert report.versions == {version: 16}
    with torch.inference_mode():
        logits = adapted(data.features[32:48], data.bits_per_symbol[32:48])
    for result in results:
        row = int(result.slot_id.split("-")[1])
        k = int(slots.bits_per_symbol[32 + row])
        expected = logits[row, :k].permute(2, 1, 0).numpy()[slots.data_mask[32 + row]]
        served = codec.decode(result.llrs, "llrs", pb.Tensor.FLOAT32, 2, 10**6)
        np.testing.assert_allclose(served, expected, atol=1e-4)


def test_a_version_whose_backend_cannot_be_built_is_never_activated(server, channel):
    stub = pb_grpc.ReceiverStub(channel)
    torch.manual_seed(1)
    version = server.registry.publish(DeepRx(config_for("tiny")).eval(), creator="test")
    server.registry.inference = InferenceConfig(backend="onnxruntime", opset=99)  # no exporter knows opset 99
    with pytest.raises(BackendError, match="ONNX export or session failed"):
        server.registry.activate(version)
    with pytest.raises(grpc.RpcError) as err:
        stub.ActivateModel(pb.ActivateModelRequest(version=version))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "cannot be served" in err.value.details()
    assert stub.GetModel(pb.GetModelRequest()).version == "v1"
