"""K-FAC and EK-FAC inverse curvature for Conv2d (grouped and depthwise included) and Linear layers.

For a layer with weight matrix ``W`` (out x in, a convolution's kernel flattened as
(in_channels/groups x kh x kw), with the bias as an extra input column of ones), the Fisher block is
approximated by ``S (x) A``:

- ``A = E_{n,l}[a a^T]``: covariance of the layer's input patches ``a`` (unfolded receptive fields,
  plus the constant 1 for the bias), averaged over samples n and output positions l;
- ``S = E_n[sum_l ds ds^T]``: covariance of the loss gradients with respect to the layer's outputs,
  summed over positions (the KFC approximation of Grosse & Martens 2016), with labels sampled from
  the model (true Fisher, the GGN of the BCE loss in expectation).

Grouped convolutions have one independent factor pair per group. **Depthwise** convolutions
(groups = channels) are thus treated exactly per channel: each channel's 3x3 kernel gets its own
9x9 input factor and a scalar output factor, no cross-channel coupling.

``kfac`` solves with the factors' eigenvalues ``lambda_S lambda_A``; ``ekfac`` keeps the Kronecker
eigenbasis ``Q_S (x) Q_A`` but re-fits the diagonal to ``E_n[(Q_S^T G_n Q_A)^2]`` with ``G_n`` the
per-sample gradient (George et al. 2018), as Kronfluence does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from service.influence.curvature import InverseCurvature
from service.influence.gradients import ParameterSpace
from service.receiver.features import SlotTensors
from service.receiver.loss import per_slot_bce_bits
from service.receiver.model import conv_patches


@dataclass
class _Layer:
    """One factored layer: where its weight/bias sit in the flat vector and its factors."""

    module: nn.Module
    groups: int
    out_per_group: int
    in_per_group: int  # inputs per group, without the bias column
    weight_slice: slice
    bias_slice: slice | None
    activation_cov: torch.Tensor | None = None  # [G, d_a, d_a]
    gradient_cov: torch.Tensor | None = None  # [G, d_s, d_s]
    eigen_a: tuple[torch.Tensor, torch.Tensor] | None = None
    eigen_s: tuple[torch.Tensor, torch.Tensor] | None = None
    corrected: torch.Tensor | None = None  # EK-FAC diagonal [G, d_s, d_a]
    positions: int = 0  # output positions l seen per sample

    @property
    def d_a(self) -> int:
        return self.in_per_group + (self.bias_slice is not None)

    def blocks(self, flat: torch.Tensor) -> torch.Tensor:
        """[K, P] -> [K, G, d_s, d_a]: this layer's slice of each vector as per-group matrices."""
        k = flat.shape[0]
        w = flat[:, self.weight_slice].reshape(k, self.groups, self.out_per_group, self.in_per_group)
        if self.bias_slice is None:
            return w
        b = flat[:, self.bias_slice].reshape(k, self.groups, self.out_per_group, 1)
        return torch.cat([w, b], dim=-1)

    def scatter(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        k = blocks.shape[0]
        out[:, self.weight_slice] = blocks[..., : self.in_per_group].reshape(k, -1)
        if self.bias_slice is not None:
            out[:, self.bias_slice] = blocks[..., -1].reshape(k, -1)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """Layer input -> [B, L, G, d_a] receptive fields (with the bias column of ones)."""
        m = self.module
        if isinstance(m, nn.Conv2d):
            cols = conv_patches(m, x).transpose(1, 2).reshape(x.shape[0], -1, self.groups, self.in_per_group)
        else:
            cols = x.reshape(x.shape[0], -1, 1, self.in_per_group)
        if self.bias_slice is not None:
            cols = torch.cat([cols, torch.ones_like(cols[..., :1])], dim=-1)
        return cols

    def output_gradients(self, grad: torch.Tensor) -> torch.Tensor:
        """dLoss/dOutput -> [B, L, G, d_s]."""
        if isinstance(self.module, nn.Conv2d):
            grad = grad.flatten(2).transpose(1, 2)
        return grad.reshape(grad.shape[0], -1, self.groups, self.out_per_group)


def _layers(space: ParameterSpace) -> list[_Layer]:
    offsets, offset = {}, 0
    for name, shape in zip(space.names, space.shapes):
        offsets[name] = slice(offset, offset + math.prod(shape))
        offset += math.prod(shape)
    layers = []
    for module_name, module in space.model.named_modules():
        weight = f"{module_name}.weight"
        if weight not in offsets:
            continue
        if isinstance(module, nn.Conv2d):
            groups = module.groups
            in_per_group = (module.in_channels // groups) * math.prod(module.kernel_size)
            out_per_group = module.out_channels // groups
        elif isinstance(module, nn.Linear):
            groups, in_per_group, out_per_group = 1, module.in_features, module.out_features
        else:
            raise ValueError(f"K-FAC cannot factor '{module_name}' ({type(module).__name__})")
        layers.append(_Layer(module, groups, out_per_group, in_per_group, offsets[weight],
                             offsets.get(f"{module_name}.bias")))
    covered = sum(l.weight_slice.stop - l.weight_slice.start + (0 if l.bias_slice is None else
                  l.bias_slice.stop - l.bias_slice.start) for l in layers)
    if covered != space.size:
        raise ValueError("K-FAC covers Conv2d/Linear weights and biases only; the parameter space has others")
    return layers


class KroneckerFactored(InverseCurvature):
    def __init__(self, space: ParameterSpace, fit: SlotTensors, damping: float, eigen_corrected: bool,
                 seed: int = 0, chunk: int = 16):
        self.name = "ekfac" if eigen_corrected else "kfac"
        self.damping = damping
        self.layers = _layers(space)
        model = space.model.eval()
        generator = torch.Generator().manual_seed(seed)
        samples = len(fit)
        for pass_ in ("factors", "eigen") if eigen_corrected else ("factors",):
            if pass_ == "eigen":
                self._eigendecompose()
            for start in range(0, len(fit), chunk):
                part = fit[start:start + chunk]
                captured = self._capture(model, part, generator if pass_ == "factors" else
                                         torch.Generator().manual_seed(seed + 1 + start))
                for layer, (a, ds) in zip(self.layers, captured):
                    if pass_ == "factors":
                        cov_a = torch.einsum("blgi,blgj->gij", a, a)
                        cov_s = torch.einsum("blgi,blgj->gij", ds, ds)
                        layer.activation_cov = cov_a if layer.activation_cov is None else layer.activation_cov + cov_a
                        layer.gradient_cov = cov_s if layer.gradient_cov is None else layer.gradient_cov + cov_s
                        layer.positions = a.shape[1]
                    else:
                        per_sample = torch.einsum("nlgs,nlga->ngsa", ds, a)
                        q_a, q_s = layer.eigen_a[1], layer.eigen_s[1]
                        rotated = torch.einsum("gts,ngta,gab->ngsb", q_s, per_sample, q_a)
                        square = rotated.square().sum(0)
                        layer.corrected = square if layer.corrected is None else layer.corrected + square
        for layer in self.layers:
            layer.activation_cov /= samples * layer.positions
            layer.gradient_cov /= samples
            if eigen_corrected:
                layer.corrected /= samples
        if not eigen_corrected:
            self._eigendecompose()

    def _capture(self, model: nn.Module, part: SlotTensors, generator: torch.Generator):
        """Each layer's input patches and output gradients under labels sampled from the model."""
        inputs, outputs, handles = {}, {}, []
        for layer in self.layers:
            def forward_hook(module, args, output, layer=layer):
                inputs[id(layer)] = args[0].detach()
                output.register_hook(lambda g, layer=layer: outputs.__setitem__(id(layer), g.detach()))
            handles.append(layer.module.register_forward_hook(forward_hook))
        try:
            with torch.enable_grad():
                for p in model.parameters():
                    p.requires_grad_(True)
                logits = model(part.features, part.bits_per_symbol)
                sampled = torch.bernoulli(torch.sigmoid(logits.detach()), generator=generator)
                per_slot_bce_bits(logits, sampled, part.valid).sum().backward()
                model.zero_grad(set_to_none=True)
        finally:
            for h in handles:
                h.remove()
        return [(layer.patches(inputs[id(layer)]), layer.output_gradients(outputs[id(layer)]))
                for layer in self.layers]

    def _eigendecompose(self) -> None:
        for layer in self.layers:
            layer.eigen_a = torch.linalg.eigh(layer.activation_cov)
            layer.eigen_s = torch.linalg.eigh(layer.gradient_cov)

    def _diagonal(self, layer: _Layer) -> torch.Tensor:
        if layer.corrected is not None:
            return layer.corrected
        return layer.eigen_s[0].clamp_min(0)[:, :, None] * layer.eigen_a[0].clamp_min(0)[:, None, :]

    def _solve(self, vectors: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(vectors)
        for layer in self.layers:
            v = layer.blocks(vectors)  # [K, G, d_s, d_a]
            q_a, q_s = layer.eigen_a[1], layer.eigen_s[1]
            rotated = torch.einsum("gts,kgta,gab->kgsb", q_s, v, q_a)
            rotated = rotated / (self._diagonal(layer) + self.damping)
            layer.scatter(torch.einsum("gst,kgta,gba->kgsb", q_s, rotated, q_a), out)
        return out

    def dense(self) -> torch.Tensor:
        """The damped curvature as a dense [P, P] matrix, built by Kronecker products (for tests)."""
        size = max(max(l.weight_slice.stop, l.bias_slice.stop if l.bias_slice else 0) for l in self.layers)
        dtype = self.layers[0].activation_cov.dtype
        dense = torch.zeros(size, size, dtype=dtype)
        for layer in self.layers:
            index = layer.blocks(torch.arange(size, dtype=dtype)[None].expand(1, -1))[0].long()  # [G, d_s, d_a]
            for g in range(layer.groups):
                q = torch.kron(layer.eigen_s[1][g], layer.eigen_a[1][g])
                block = q @ torch.diag(self._diagonal(layer)[g].reshape(-1)) @ q.T
                flat = index[g].reshape(-1)
                dense[flat[:, None], flat[None, :]] = block
        return dense + self.damping * torch.eye(size, dtype=dtype)
