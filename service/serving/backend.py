"""Inference backends: what runs a model version's forward pass in the server.

``onnxruntime`` (the default on CPU when the package is installed) exports the version once, when the
registry loads it, and runs it in an ONNX Runtime session: on this project's 2-core CPU it is several
times faster than eager PyTorch at every batch size (``benchmarks/serving.py``). ``torch`` runs the
module itself (eager, ``inference_mode``), the choice on CUDA. A version whose export or session fails
raises :class:`BackendError` at load, so it is never activated. With ``onnxruntime`` the server
featurizes in ONNX Runtime too (:class:`OnnxFeaturizer`).
"""
from __future__ import annotations

import copy
import importlib.util
import io
import logging
import os
import threading
import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch

from schema.scenario import NUM_OFDM_SYMBOLS
from service.receiver.classical import PilotLayout
from service.receiver.features import featurize_layout, num_feature_channels
from service.receiver.model import DeepRx

log = logging.getLogger("deeprx.backend")

BACKENDS = ("auto", "onnxruntime", "torch")
# torch.onnx.export keeps process-wide state and fails when two threads export at once (an activation
# RPC and the adaptation worker, say): exports take turns.
_EXPORT_LOCK = threading.Lock()


@dataclass
class InferenceConfig:
    backend: str = "auto"  # auto: onnxruntime on CPU when installed, else torch
    # ONNX Runtime intra-op threads, or eager PyTorch's on the CPU, of each batcher worker (0: the
    # cores shared out among the workers: ``for_workers``)
    threads: int = 0
    opset: int = 17  # ONNX opset the versions are exported with
    # ONNX Runtime's intra-op threads busy-wait between the operators of a run (its default; without
    # it each of the model's ~100 small operators waits for a thread to wake). spinning = false lets
    # them sleep: less CPU per slot, less throughput
    spinning: bool = True
    # and between runs: false stops the spinning when a run ends, so the cores go to the batcher's
    # featurizing, the event loop and capture while no forward pass runs (ONNX Runtime's
    # session.force_spinning_stop; true is ONNX Runtime's default)
    spin_between_runs: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"inference.backend must be one of {', '.join(BACKENDS)}, got '{self.backend}'")

    def for_workers(self, workers: int) -> InferenceConfig:
        """This config for one of ``workers`` threads that run batches at once: ``threads = 0`` becomes
        its share of the cores this process may use (at least one)."""
        return replace(self, threads=self.threads or max(1, len(os.sched_getaffinity(0)) // workers))


class BackendError(RuntimeError):
    """A model version that cannot be run by the configured backend."""


class TorchBackend:
    """The module itself, on its device."""

    name = "torch"

    def __init__(self, model: DeepRx):
        self.model = model
        self.device = next(model.parameters()).device

    def __call__(self, features: torch.Tensor, bits_per_symbol: torch.Tensor) -> torch.Tensor:
        """features [B, C, F, S] float32, bits_per_symbol [B] -> logits [B, 6, F, S] float32 on the CPU."""
        with torch.inference_mode():
            return self.model(features.to(self.device), bits_per_symbol.to(self.device)).float().cpu()


def _session(module: torch.nn.Module, example: tuple, names: list[str], dynamic_axes: dict, threads: int, opset: int,
             spinning: bool, spin_between_runs: bool):
    """``module`` exported with ``example`` inputs, in an ONNX Runtime session on the CPU."""
    import onnxruntime

    buffer = io.BytesIO()
    with _EXPORT_LOCK, warnings.catch_warnings():  # the TorchScript exporter is deprecated; it is fast
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, buffer, dynamo=False, opset_version=opset, input_names=names[:-1],
                          output_names=names[-1:], dynamic_axes=dynamic_axes)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.add_session_config_entry("session.force_spinning_stop", "0" if spin_between_runs else "1")
    return onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


class OnnxRuntimeBackend:
    """The version exported to ONNX (batch and subcarrier axes dynamic) in one ONNX Runtime session."""

    name = "onnxruntime"

    def __init__(self, model: DeepRx, threads: int = 0, opset: int = 17, spinning: bool = True,
                 spin_between_runs: bool = False):
        example = (torch.zeros(1, num_feature_channels(model.config.rx), 12, 14), torch.full((1,), 4))
        try:
            self.session = _session(copy.deepcopy(model).cpu().eval(), example, ["features", "bits_per_symbol", "logits"],
                                    {"features": {0: "batch", 2: "subcarriers"}, "bits_per_symbol": {0: "batch"},
                                     "logits": {0: "batch", 2: "subcarriers"}},
                                    threads, opset, spinning, spin_between_runs)
        except Exception as err:  # noqa: BLE001 - any exporter or runtime failure makes the version unservable
            raise BackendError(f"ONNX export or session failed: {type(err).__name__}: {err}") from err

    def __call__(self, features: torch.Tensor, bits_per_symbol: torch.Tensor) -> torch.Tensor:
        inputs = {"features": np.ascontiguousarray(features.numpy(), np.float32),
                  "bits_per_symbol": bits_per_symbol.numpy().astype(np.int64)}
        return torch.from_numpy(self.session.run(None, inputs)[0])


Backend = TorchBackend | OnnxRuntimeBackend


class _LayoutGraph(torch.nn.Module):
    """``featurize_layout`` for one layout and set of QAM orders, as a module to export."""

    def __init__(self, layout: PilotLayout, orders: tuple[int, ...]):
        super().__init__()
        self.layout, self.orders = layout, orders

    def forward(self, y, pilots, noise_variance, bits_per_symbol):
        return featurize_layout(y, pilots, noise_variance, bits_per_symbol, self.layout, self.orders,
                                estimate_unknown_noise=True)


class OnnxFeaturizer:
    """The featurizer's per-layout arithmetic (``features.featurize_layout``) exported to ONNX, one
    session per (antennas, DMRS layout and grid width, QAM orders of the batch), built the first time
    such a batch arrives (that batch waits a third of a second for it): a batch is featurized in one
    runtime call that holds no interpreter lock, where the same arithmetic in torch is some 300 small
    calls that each give the lock up and wait to take it back. One intra-op thread: its operators are too small to share (two
    threads were slower at every batch size)."""

    def __init__(self, config: InferenceConfig):
        self.config = config
        # key -> (session, its input names), or None: the export failed, torch serves those slots
        self._sessions: dict[tuple[int, PilotLayout, tuple[int, ...]], tuple[object, list[str]] | None] = {}
        self._building = threading.Lock()

    def __call__(self, y: torch.Tensor, pilots: torch.Tensor, noise_variance: torch.Tensor,
                 bits_per_symbol: torch.Tensor, layout: PilotLayout, orders: tuple[int, ...]) -> torch.Tensor:
        """``featurize_layout``'s signature."""
        key = (y.shape[1], layout, orders)
        if key not in self._sessions:
            with self._building:  # batcher workers that meet a new layout at once export it once
                if key not in self._sessions:
                    try:
                        self._sessions[key] = self._build(*key)
                    except Exception:  # noqa: BLE001 - the same arithmetic in torch still serves these slots
                        log.exception("exporting the featurizer for %s failed; featurizing those slots in torch", key)
                        self._sessions[key] = None
        built = self._sessions[key]
        if built is None:
            return featurize_layout(y, pilots, noise_variance, bits_per_symbol, layout, orders)
        session, names = built
        inputs = {"y": y.numpy(), "pilots": pilots.numpy(), "noise_variance": noise_variance.numpy(),
                  "bits_per_symbol": bits_per_symbol.numpy().astype(np.int64)}
        return torch.from_numpy(session.run(None, {name: inputs[name] for name in names})[0])

    def _build(self, antennas: int, layout: PilotLayout, orders: tuple[int, ...]) -> tuple[object, list[str]]:
        noise = torch.Generator().manual_seed(0)  # not the global generator, which other threads draw from
        example = (torch.randn(1, antennas, NUM_OFDM_SYMBOLS, layout.num_subcarriers, 2, generator=noise),
                   torch.zeros(1, NUM_OFDM_SYMBOLS, layout.num_subcarriers, 2), torch.ones(1),
                   torch.full((1,), orders[0]))
        names = ["y", "pilots", "noise_variance", "bits_per_symbol", "features"]
        session = _session(_LayoutGraph(layout, orders), example, names, {name: {0: "batch"} for name in names},
                           1, self.config.opset, self.config.spinning, self.config.spin_between_runs)
        # a graph for one QAM order has no use for bits_per_symbol, and the exporter drops unused inputs
        return session, [i.name for i in session.get_inputs()]


def resolve(config: InferenceConfig, device: torch.device) -> str:
    """The backend ``config`` names on ``device``: ``auto`` is onnxruntime on CPU when installed."""
    if config.backend != "auto":
        if config.backend == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
            raise BackendError("inference.backend = 'onnxruntime' but the onnxruntime package is not installed")
        return config.backend
    if device.type == "cpu" and importlib.util.find_spec("onnxruntime") is not None:
        return "onnxruntime"
    return "torch"


def build_backend(model: DeepRx, config: InferenceConfig, device: torch.device) -> Backend:
    """A backend for ``model`` (already on ``device``, in eval mode)."""
    if resolve(config, device) == "onnxruntime":
        return OnnxRuntimeBackend(model, config.threads, config.opset, config.spinning, config.spin_between_runs)
    return TorchBackend(model)
