"""DeepRx: a fully convolutional receiver from received grid to one logit (LLR) per bit per RE.

The published shape (Honkala et al., "DeepRx", 2021): a 3x3 input convolution, pre-activation
ResNet blocks of depthwise-separable 3x3 convolutions with dilations over (subcarrier, symbol),
and a 1x1 output convolution with one logit per bit (6, enough for 64QAM), masked by modulation.
Optionally one learned multiplicative layer (after Korpi et al., "DeepRx MIMO", 2021) mid-network:
see ``MatchedFilter``. Logits follow Sionna's LLR sign: ``log P(b=1) / P(b=0)``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from schema.scenario import MAX_BITS_PER_SYMBOL
from service.receiver.features import bit_mask, num_input_channels

LLR_INPUT_SCALE = 8.0
PADDINGS = ("zeros", "replicate")
_FULL_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 128, 128, 64, 64)
# (subcarrier, symbol) dilations: wide in frequency where the channel is smooth, short in time.
_FULL_DILATIONS = ((1, 1), (1, 1), (2, 3), (2, 3), (2, 3), (3, 6), (2, 3), (2, 3), (2, 3), (1, 1), (1, 1))


@dataclass(frozen=True)
class DeepRxConfig:
    """Architecture of one DeepRx; ``dilations`` are (subcarrier, symbol) per block; ``products``
    complex estimates enter a ``MatchedFilter`` after block ``products_after`` (0 products: none);
    ``inputs`` names the feature channels it reads (``features.INPUTS``); ``padding`` is what the 3x3
    convolutions read past the slot's edges: ``zeros`` (the published DeepRx) or ``replicate`` (the
    edge REs repeated, so edge symbols and subcarriers see their neighbours' values, not silence)."""

    widths: tuple[int, ...]
    dilations: tuple[tuple[int, int], ...]
    rx: int = 2
    products: int = 0
    products_after: int = 0
    inputs: str = "grid"
    padding: str = "zeros"

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.dilations):
            raise ValueError("widths and dilations must have one entry per block")
        if not 0 <= self.products_after < len(self.widths):
            raise ValueError("products_after must name a block")
        num_input_channels(self.rx, self.inputs)  # validates inputs
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, got '{self.padding}'")

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(values: dict) -> "DeepRxConfig":
        return DeepRxConfig(tuple(values["widths"]), tuple(tuple(d) for d in values["dilations"]), values["rx"],
                            values.get("products", 0), values.get("products_after", 0), values.get("inputs", "grid"),
                            values.get("padding", "zeros"))


def _scaled(divisor: int, rx: int) -> DeepRxConfig:
    # products after block 4: its receptive field (33 subcarriers x 45 symbols) spans the pilots
    return DeepRxConfig(tuple(w // divisor for w in _FULL_WIDTHS), _FULL_DILATIONS, rx, 32 // divisor, 4, "classical")


SIZES = {
    "tiny": lambda rx: DeepRxConfig((8, 8), ((1, 1), (2, 3)), rx),  # the published shape, shrunk: tests
    "small": lambda rx: _scaled(4, rx),
    "full": lambda rx: _scaled(1, rx),
    "published": lambda rx: DeepRxConfig(_FULL_WIDTHS, _FULL_DILATIONS, rx),  # Honkala et al.: grid inputs only
}


def config_for(size: str, rx: int = 2, inputs: str | None = None, padding: str | None = None) -> DeepRxConfig:
    """The architecture of ``size``; ``inputs`` and ``padding`` override its own (for ablations)."""
    if size not in SIZES:
        raise ValueError(f"unknown model size '{size}' (one of {', '.join(SIZES)})")
    config = SIZES[size](rx)
    overrides = {name: value for name, value in (("inputs", inputs), ("padding", padding)) if value}
    return replace(config, **overrides)


def conv_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The receptive fields ``conv`` reads from ``x`` [B, I, H, W] as ``F.unfold`` lays them out,
    [B, I*kh*kw, L], its padding mode included (per-sample gradients and curvature factors need them)."""
    if conv.padding_mode == "zeros":
        return F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    (pad_h, pad_w) = conv.padding  # symmetric: (left, right, top, bottom) for F.pad
    padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode=conv.padding_mode)
    return F.unfold(padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)


class DilatedDepthwiseConv(nn.Conv2d):
    """Depthwise 3x3 convolution with 'same' padding and dilation (dh, dw). When gradients flow it is
    computed as an undilated convolution on the space-to-batch rearrangement (each of the dh x dw
    phases, every dh-th row and dw-th column, becomes a batch item): the same function, but oneDNN's
    backward of a dilated depthwise convolution is several times slower than the undilated one, and
    on this CPU it made a fine-tuning step 0.31 s instead of 0.24 s. Inference (no gradients, ONNX
    export) and torch.func transforms (per-sample gradients, GGN products), where the rearranging
    copies cost more than they save, keep the direct dilated convolution, and so does replicate
    padding (the rearrangement pads with zeros)."""

    def __init__(self, channels: int, dilation: tuple[int, int], padding: str = "zeros"):
        super().__init__(channels, channels, 3, padding=dilation, dilation=dilation, groups=channels, bias=False,
                         padding_mode=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dh, dw = self.dilation
        autograd = (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
                    and not torch._C._are_functorch_transforms_active())  # under vmap/jvp the copies cost more
        if ((dh, dw) == (1, 1) or not autograd or self.padding_mode != "zeros" or torch.jit.is_tracing()
                or torch.onnx.is_in_onnx_export()):
            return super().forward(x)
        batch, channels, height, width = x.shape
        rows, cols = -(-height // dh), -(-width // dw)  # phase grid, zero-padded to a multiple
        x = F.pad(x, (0, cols * dw - width, 0, rows * dh - height))
        phases = (x.reshape(batch, channels, rows, dh, cols, dw).permute(0, 3, 5, 1, 2, 4)
                  .reshape(batch * dh * dw, channels, rows, cols))
        y = F.conv2d(phases, self.weight, padding=1, groups=channels)
        y = y.reshape(batch, dh, dw, channels, rows, cols).permute(0, 3, 4, 1, 5, 2)
        return y.reshape(batch, channels, rows * dh, cols * dw)[:, :, :height, :width]


class _DepthwiseSeparable(nn.Sequential):
    def __init__(self, cin: int, cout: int, dilation: tuple[int, int], padding: str):
        super().__init__(
            DilatedDepthwiseConv(cin, tuple(dilation), padding),
            nn.Conv2d(cin, cout, 1),
        )


class ResBlock(nn.Module):
    """Pre-activation residual block: (BN, ReLU, depthwise-separable conv) twice, plus a skip."""

    def __init__(self, cin: int, cout: int, dilation: tuple[int, int], padding: str = "zeros"):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(), _DepthwiseSeparable(cin, cout, dilation, padding),
            nn.BatchNorm2d(cout), nn.ReLU(), _DepthwiseSeparable(cout, cout, dilation, padding),
        )
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class MatchedFilter(nn.Module):
    """Learned multiplicative transformation. Demapping needs products such as ``conj(h) y`` and
    ``|h|^2``, which ReLU convolutions only approximate with much width; here the feature map
    proposes ``K`` complex channel-like estimates ``u_k`` (1x1 conv), the layer forms
    ``conj(u_k) y_a`` for every antenna and ``|u_k|^2`` exactly, and adds a 1x1 projection of those
    ``K (2A + 1)`` maps back into the residual stream."""

    def __init__(self, width: int, count: int, rx: int):
        super().__init__()
        self.estimate = nn.Conv2d(width, 2 * count, 1)
        self.project = nn.Conv2d(count * (2 * rx + 1), width, 1)

    def forward(self, x: torch.Tensor, y_real: torch.Tensor, y_imag: torch.Tensor) -> torch.Tensor:
        """``x`` [B, C, F, S]; ``y_real``, ``y_imag`` [B, A, F, S] (the received grid)."""
        u_real, u_imag = self.estimate(x)[:, :, None].chunk(2, dim=1)  # [B, K, 1, F, S] each
        y_real, y_imag = y_real[:, None], y_imag[:, None]  # [B, 1, A, F, S]
        matched_real = u_real * y_real + u_imag * y_imag  # conj(u) y
        matched_imag = u_real * y_imag - u_imag * y_real
        energy = (u_real.square() + u_imag.square())[:, :, 0]
        return x + self.project(torch.cat([matched_real.flatten(1, 2), matched_imag.flatten(1, 2), energy], dim=1))


class DeepRx(nn.Module):
    """features [B, 8A+21, F, S] (it reads the first ``num_inputs``), bits_per_symbol [B]
    -> logits [B, 6, F, S] (unused bits are 0). With ``residual`` inputs the logits are LS-LMMSE's
    LLRs plus the network's correction; with ``weighted`` inputs they are the network's own plus
    LS-LMMSE's LLRs times a per-RE weight the network computes (``prior_weight``): where the
    classical chain is near-perfect (two pilot symbols, high SNR) the network can pass its decisions
    through, and leave them out where its estimate is poor, instead of learning to cancel them. With
    ``robust`` inputs it also reads the robust LMMSE estimate and adds its LLRs with a second weight."""

    def __init__(self, config: DeepRxConfig):
        super().__init__()
        self.config = config
        widths = config.widths
        self.num_inputs = num_input_channels(config.rx, config.inputs)
        weighted = config.inputs in ("weighted", "robust")
        # weighted: the LLRs bypass the trunk, which reads the classical inputs (so it can start from such a model)
        self.num_weighted = num_input_channels(config.rx, "weighted")
        trunk_inputs = self.num_weighted - MAX_BITS_PER_SYMBOL if weighted else self.num_inputs
        self.input_conv = nn.Conv2d(trunk_inputs, widths[0], 3, padding=1, padding_mode=config.padding)
        # robust: the robust estimate's channels enter through a convolution of their own, zero at the
        # start, and its LLRs get a weight of their own: initialised from a weighted model, it computes
        # that model's logits exactly and learns from there how far to trust the better estimate
        robust = config.inputs == "robust"
        self.robust_conv = (nn.Conv2d(self.num_inputs - self.num_weighted - MAX_BITS_PER_SYMBOL, widths[0], 3,
                                      padding=1, padding_mode=config.padding, bias=False) if robust else None)
        self.robust_weight = nn.Conv2d(widths[-1], 1, 1) if robust else None
        self.blocks = nn.Sequential(*[
            ResBlock(cin, cout, d, config.padding)
            for cin, cout, d in zip((widths[0],) + widths[:-1], widths, config.dilations)
        ])
        self.matched_filter = (MatchedFilter(widths[config.products_after], config.products, config.rx)
                               if config.products else None)
        self.head = nn.Sequential(nn.BatchNorm2d(widths[-1]), nn.ReLU(), nn.Conv2d(widths[-1], MAX_BITS_PER_SYMBOL, 1))
        self.residual = config.inputs == "residual"
        if self.residual:  # a correction of LS-LMMSE's LLRs that starts at zero: the untrained model is LS-LMMSE
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)
        # The weight is a 1x1 convolution of the head's normalised features, unbounded and zero at the start:
        # a weighted model initialised from a classical one computes its logits exactly, and its gradient
        # never vanishes (a weight clamped to [0, 1] and started at 0 was pushed below it everywhere
        # within a few steps of a fine-tune and never came back).
        self.prior_weight = nn.Conv2d(widths[-1], 1, 1) if weighted else None
        for layer in (self.prior_weight, self.robust_conv, self.robust_weight):
            for parameter in (layer.parameters() if layer is not None else ()):
                nn.init.zeros_(parameter)

    def forward(self, features: torch.Tensor, bits_per_symbol: torch.Tensor) -> torch.Tensor:
        inputs = features[:, :self.num_inputs]
        if self.robust_conv is not None:  # the robust estimate's channels, then its LLRs, follow the weighted inputs
            robust, robust_llrs = inputs[:, self.num_weighted:-MAX_BITS_PER_SYMBOL], inputs[:, -MAX_BITS_PER_SYMBOL:]
            inputs = inputs[:, :self.num_weighted]
        if self.residual or self.prior_weight is not None:  # these inputs end with LS-LMMSE's LLRs
            inputs, prior = inputs[:, :-MAX_BITS_PER_SYMBOL], inputs[:, -MAX_BITS_PER_SYMBOL:]
            if self.residual:  # they also enter the trunk, scaled to the other features' range
                inputs = torch.cat([inputs, prior / LLR_INPUT_SCALE], dim=1)
        x = self.input_conv(inputs)
        if self.robust_conv is not None:
            x = x + self.robust_conv(robust)
        rx = self.config.rx  # features start with Re Y (rx channels), then Im Y (rx channels)
        for index, block in enumerate(self.blocks):
            x = block(x)
            if self.matched_filter is not None and index == self.config.products_after:
                x = self.matched_filter(x, features[:, :rx], features[:, rx:2 * rx])
        normalize, activate, output = self.head
        normalized = normalize(x)
        logits = output(activate(normalized))
        if self.residual:
            logits = logits + prior
        elif self.prior_weight is not None:
            logits = logits + self.prior_weight(normalized) * prior
            if self.robust_weight is not None:
                logits = logits + self.robust_weight(normalized) * robust_llrs
        return logits * bit_mask(bits_per_symbol)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
