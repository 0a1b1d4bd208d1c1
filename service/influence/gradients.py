"""What influence differentiates: per-sample gradients of the training loss and GGN-vector products.

The loss of one sample z is the capacity-like BCE in bits (``service.receiver.loss.per_slot_bce_bits``);
``g(z)`` is its gradient over a chosen set of parameters (default: every convolution weight and
bias; batch-norm scales/shifts are left out, as in Kronfluence). The model is in eval mode, so
batch norm uses its running statistics and each sample's gradient depends on that sample alone.

The curvature reference is the Gauss-Newton matrix of the same loss,
``G = 1/N sum_n J_n^T Lambda_n J_n`` with ``J_n`` the Jacobian of sample n's logits and
``Lambda_n = diag(w sigma(f)(1 - sigma(f)))``, ``w = 1 / (valid bits * ln 2)`` on valid bits, 0 elsewhere
(the Hessian of the BCE-in-bits loss with respect to the logits, exact and positive semi-definite).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from service.receiver.features import SlotTensors
from service.receiver.loss import per_slot_bce_bits
from service.receiver.model import conv_patches


@dataclass
class ParameterSpace:
    """The parameters influence is computed over, and flat-vector <-> per-tensor conversions."""

    model: nn.Module
    names: list[str]

    @staticmethod
    def convolutions(model: nn.Module) -> "ParameterSpace":
        """Every Conv2d/Linear weight and bias (the layers K-FAC can factor)."""
        names = [f"{module_name}.{p}" for module_name, module in model.named_modules()
                 if isinstance(module, (nn.Conv2d, nn.Linear))
                 for p, _ in module.named_parameters(recurse=False)]
        return ParameterSpace(model, names)

    @property
    def shapes(self) -> list[torch.Size]:
        params = dict(self.model.named_parameters())
        return [params[n].shape for n in self.names]

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def values(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return {n: params[n].detach() for n in self.names}

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """[P] -> {name: tensor}."""
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes):
            n = math.prod(shape)
            out[name] = flat[offset:offset + n].view(shape)
            offset += n
        return out

    def flatten(self, tensors: dict[str, torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
        lead = next(iter(tensors.values())).shape[:batch_dims]
        return torch.cat([tensors[n].reshape(*lead, -1) for n in self.names], dim=-1)

    def _call(self, params: dict[str, torch.Tensor], features: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        frozen = {n: p.detach() for n, p in self.model.named_parameters() if n not in params}
        buffers = dict(self.model.named_buffers())
        return functional_call(self.model, {**frozen, **buffers, **params}, (features, k))

    def per_sample_gradients(self, data: SlotTensors, chunk: int = 32) -> torch.Tensor:
        """``g(z)`` for every sample: [N, P], computed ``chunk`` samples at a time (vmap over grad)."""
        self.model.eval()
        params = self.values()

        def sample_loss(p, features, k, labels, valid):
            logits = self._call(p, features[None], k[None])
            return per_slot_bce_bits(logits, labels[None], valid[None])[0]

        per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0, 0, 0))
        rows = []
        for start in range(0, len(data), chunk):
            part = data[start:start + chunk]
            g = per_sample(params, part.features, part.bits_per_symbol, part.labels, part.valid)
            rows.append(self.flatten(g, batch_dims=1))
        return torch.cat(rows)

    def masked_per_sample_gradients(self, data: SlotTensors, kept: torch.Tensor, chunk: int = 32) -> torch.Tensor:
        """``g(z)[kept]`` for every sample, [N, len(kept)] (``kept``: sorted flat coordinates), without
        forming the other coordinates: one batched backward gives each convolution's per-sample
        output gradient ``dY`` and (unfolded) input ``X``; a kept weight coordinate (o, r) is then
        ``sum_l dY[o, l] X[r, l]`` and a kept bias coordinate ``sum_l dY[o, l]``. Cost and memory scale
        with the kept fraction, not with P. Convolutions only (grouped and depthwise included)."""
        self.model.eval()
        modules, params = dict(self.model.named_modules()), dict(self.model.named_parameters())
        pieces, offset = [], 0  # (conv, "weight" | "bias", kept coordinates inside it), in flat order
        for name in self.names:
            module_name, kind = name.rsplit(".", 1)
            if not isinstance(modules[module_name], nn.Conv2d):
                raise ValueError(f"masked per-sample gradients support Conv2d layers only, not '{module_name}'")
            size = params[name].numel()
            inside = kept[(kept >= offset) & (kept < offset + size)] - offset
            if len(inside):
                pieces.append((modules[module_name], kind, inside))
            offset += size
        convs = list(dict.fromkeys(conv for conv, _, _ in pieces))
        rows = []
        for start in range(0, len(data), chunk):
            part = data[start:start + chunk]
            inputs, outputs = {}, {}

            def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
                inputs[module], outputs[module] = args[0].detach(), out

            hooks = [conv.register_forward_hook(record) for conv in convs]
            try:
                logits = self.model(part.features, part.bits_per_symbol)
            finally:
                for hook in hooks:
                    hook.remove()
            loss = per_slot_bce_bits(logits, part.labels, part.valid).sum()  # samples are independent in eval mode
            d_out = {conv: g.flatten(2) for conv, g in  # [B, O, L] per convolution
                     zip(convs, torch.autograd.grad(loss, [outputs[conv] for conv in convs]))}
            rows.append(torch.cat([_masked_bias_gradient(d_out[conv], inside) if kind == "bias" else
                                   _masked_weight_gradient(conv, inputs[conv], d_out[conv], inside)
                                   for conv, kind, inside in pieces], dim=1))
        return torch.cat(rows)

    def mean_gradient(self, data: SlotTensors, chunk: int = 64) -> torch.Tensor:
        """Gradient of the mean loss over ``data`` (the target gradient ``g_T``): [P]."""
        self.model.eval()
        total = torch.zeros(self.size, dtype=next(self.model.parameters()).dtype)
        params = {n: p.clone().requires_grad_(True) for n, p in self.values().items()}
        for start in range(0, len(data), chunk):
            part = data[start:start + chunk]
            logits = self._call(params, part.features, part.bits_per_symbol)
            loss = per_slot_bce_bits(logits, part.labels, part.valid).sum() / len(data)
            grads = torch.autograd.grad(loss, [params[n] for n in self.names])
            total += torch.cat([g.reshape(-1) for g in grads])
        return total

    def ggn_vector_product(self, data: SlotTensors, vectors: torch.Tensor, chunk: int = 64,
                           vector_chunk: int = 64) -> torch.Tensor:
        """``G v`` for the Gauss-Newton matrix of the mean loss over ``data``.

        ``vectors`` is [P] or [K, P]; K vectors are pushed through together (vmap over the tangents).
        """
        self.model.eval()
        single = vectors.dim() == 1
        vectors = vectors[None] if single else vectors
        params = self.values()
        out = torch.zeros_like(vectors)
        for start in range(0, len(data), chunk):
            part = data[start:start + chunk]
            fn = lambda p: self._call(p, part.features, part.bits_per_symbol)  # noqa: E731
            logits, pullback = vjp(fn, params)
            prob = torch.sigmoid(logits)
            valid = part.valid.to(logits.dtype)
            curvature = valid * prob * (1 - prob) / (valid.sum(dim=(1, 2, 3), keepdim=True).clamp_min(1) * math.log(2))

            def product(tangent: torch.Tensor) -> torch.Tensor:
                _, jv = jvp(fn, (params,), (self.unflatten(tangent),))
                return self.flatten(pullback(curvature * jv)[0])

            for k in range(0, len(vectors), vector_chunk):
                out[k:k + vector_chunk] += vmap(product)(vectors[k:k + vector_chunk])
        out /= len(data)
        return out[0] if single else out


def _masked_bias_gradient(d_out: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    return d_out[:, kept].sum(-1)


def _masked_weight_gradient(conv: nn.Conv2d, x: torch.Tensor, d_out: torch.Tensor, kept: torch.Tensor,
                            block: int = 2048) -> torch.Tensor:
    """Per-sample gradients of the kept flat coordinates of ``conv.weight`` [O, I/g, kh, kw]. Few
    kept coordinates: one product-and-sum over positions each (nothing else formed). Past 1/16 of
    the layer's weights, the layer's dense per-sample gradient by one batched matmul, then a gather,
    is faster (the elementwise path is memory-bound); it lives for this layer only."""
    kernel = conv.kernel_size[0] * conv.kernel_size[1]
    per_group_in = conv.in_channels // conv.groups
    unfolded = conv_patches(conv, x)  # [B, I*kh*kw, L]
    row_size = per_group_in * kernel
    if 16 * len(kept) >= conv.weight.numel():
        batch, positions = d_out.shape[0], d_out.shape[-1]
        grouped_out = d_out.reshape(batch, conv.groups, conv.out_channels // conv.groups, positions)
        grouped_in = unfolded.reshape(batch, conv.groups, row_size, positions)
        return (grouped_out @ grouped_in.transpose(2, 3)).reshape(batch, -1)[:, kept]
    out_channel, row = kept // row_size, kept % row_size
    group = out_channel // (conv.out_channels // conv.groups)
    input_row = group * row_size + row  # the unfold row of (input channel, kernel position)
    return torch.cat([(d_out[:, out_channel[i:i + block]] * unfolded[:, input_row[i:i + block]]).sum(-1)
                      for i in range(0, len(kept), block)], dim=1)
