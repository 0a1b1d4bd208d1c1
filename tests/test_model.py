import math

import pytest
import torch

from service.receiver.checkpoint import load_checkpoint, save_checkpoint
from service.receiver.features import num_feature_channels
from service.receiver.loss import bce_bits, bit_errors, per_slot_bce_bits
from service.receiver.model import (
    PADDINGS,
    DeepRx,
    DeepRxConfig,
    DilatedDepthwiseConv,
    MatchedFilter,
    config_for,
    conv_patches,
)


@pytest.mark.parametrize("rx", [1, 2, 4])
def test_output_shape_is_six_logits_per_re(rx):
    model = DeepRx(config_for("tiny", rx)).eval()
    out = model(torch.randn(3, 4 * rx + 2, 24, 14), torch.tensor([2, 4, 6]))
    assert out.shape == (3, 6, 24, 14)


def test_unused_bits_are_masked_per_modulation():
    model = DeepRx(config_for("tiny")).eval()
    out = model(torch.randn(3, 10, 12, 14), torch.tensor([2, 4, 6]))
    for row, k in enumerate((2, 4, 6)):
        assert torch.all(out[row, k:] == 0)
        assert torch.all(out[row, :k] != 0)


def test_sizes_grow_and_full_is_the_published_shape():
    counts = {size: DeepRx(config_for(size)).num_parameters() for size in ("tiny", "small", "full")}
    assert counts["tiny"] < 5_000 < counts["small"] < 100_000 < counts["full"]
    full = config_for("full")
    assert len(full.widths) == 11 and min(full.widths) == 64 and max(full.widths) == 256


def test_matched_filter_forms_conj_u_times_y_and_energy_exactly():
    torch.manual_seed(0)
    layer = MatchedFilter(width=2, count=1, rx=2)
    with torch.no_grad():  # u = x[0] + i x[1]; the projection copies conj(u) y_0 into channel 0, |u|^2 into 1
        layer.estimate.weight.copy_(torch.eye(2)[:, :, None, None])
        layer.estimate.bias.zero_()
        layer.project.weight.zero_()
        layer.project.bias.zero_()
        layer.project.weight[0, 0] = 1.0  # Re conj(u) y_0
        layer.project.weight[1, 4] = 1.0  # |u|^2 (after Re x2 antennas, Im x2 antennas)
    x, y = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4, dtype=torch.complex64)
    out = layer(x, y.real, y.imag)
    u = torch.complex(x[:, 0], x[:, 1])
    assert torch.allclose(out[:, 0] - x[:, 0], (u.conj() * y[:, 0]).real, atol=1e-6)
    assert torch.allclose(out[:, 1] - x[:, 1], u.abs().square(), atol=1e-6)


@pytest.mark.parametrize("dilation,width", [((2, 3), 14), ((3, 6), 14), ((3, 6), 5), ((2, 3), 12)])
def test_dilated_depthwise_convolution_with_gradients_is_the_dilated_convolution(dilation, width):
    torch.manual_seed(0)
    conv = DilatedDepthwiseConv(4, dilation).double()
    x = torch.randn(3, 4, 13, width, dtype=torch.float64, requires_grad=True)
    direct = torch.nn.functional.conv2d(x, conv.weight, padding=dilation, dilation=dilation, groups=4)
    rearranged = conv(x)  # parameters require gradients: the space-to-batch path
    assert torch.allclose(rearranged, direct, atol=1e-12)
    upstream = torch.randn_like(direct)
    expected = torch.autograd.grad(direct, [x, conv.weight], upstream)
    for got, want in zip(torch.autograd.grad(rearranged, [x, conv.weight], upstream), expected):
        assert torch.allclose(got, want, atol=1e-12)
    with torch.no_grad():
        assert torch.allclose(conv(x), direct, atol=1e-12)


@pytest.mark.parametrize("padding", PADDINGS)
def test_replicate_padding_repeats_the_edge_and_patches_follow_the_padding(padding):
    torch.manual_seed(0)
    conv = DilatedDepthwiseConv(4, (3, 6), padding).double()
    x = torch.randn(2, 4, 12, 14, dtype=torch.float64, requires_grad=True)
    mode = "constant" if padding == "zeros" else padding
    padded = torch.nn.functional.pad(x, (6, 6, 3, 3), mode=mode)
    direct = torch.nn.functional.conv2d(padded, conv.weight, dilation=(3, 6), groups=4)
    y = conv(x)  # parameters require gradients: zeros takes the space-to-batch path, replicate the direct one
    assert torch.allclose(y, direct, atol=1e-12)
    upstream = torch.randn_like(y)
    (weight_grad,) = torch.autograd.grad(y, [conv.weight], upstream)
    patches = conv_patches(conv, x).reshape(2, 4, 9, -1)  # [B, channel, tap, position]
    from_patches = torch.einsum("bcl,bckl->ck", upstream.flatten(2), patches).reshape(conv.weight.shape)
    assert torch.allclose(from_patches, weight_grad, atol=1e-10)


def test_a_replicate_model_exports_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = DeepRx(config_for("tiny", padding="replicate")).eval()
    assert DeepRxConfig.from_dict(model.config.to_dict()).padding == "replicate"
    save_checkpoint(tmp_path / "m", model, {"size": "tiny"})
    loaded = load_checkpoint(tmp_path / "m").model
    features, k = torch.randn(2, num_feature_channels(2), 12, 14), torch.full((2,), 4)
    with torch.no_grad():
        assert torch.equal(loaded(features, k), model(features, k))
        zeros = DeepRx(config_for("tiny")).eval()
        zeros.load_state_dict(model.state_dict())  # same weights, other padding: only the edges differ
        difference = (zeros(features, k) - model(features, k)).abs().amax(dim=(0, 1))  # [F, S]
        assert difference[0].max() > 0 and difference[-1].max() > 0
    from service.serving.backend import OnnxRuntimeBackend  # edge padding exports as ONNX Pad(mode=edge)

    with torch.no_grad():
        torch.testing.assert_close(OnnxRuntimeBackend(model)(features, k), model(features, k), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="padding"):
        config_for("tiny", padding="reflect")


def test_configs_without_products_still_load():
    values = config_for("small").to_dict()
    del values["products"], values["products_after"]
    assert DeepRxConfig.from_dict(values).products == 0
    with pytest.raises(ValueError, match="products_after"):
        DeepRxConfig((8,), ((1, 1),), 2, 2, 1)


def test_loss_of_a_receiver_that_knows_nothing_is_one_bit():
    labels = torch.randint(0, 2, (2, 6, 4, 14)).float()
    valid = torch.ones_like(labels, dtype=torch.bool)
    assert float(bce_bits(torch.zeros_like(labels), labels, valid)) == pytest.approx(1.0)


def test_loss_on_a_known_example_counts_only_valid_bits():
    logits = torch.zeros(1, 6, 1, 2)
    labels = torch.zeros(1, 6, 1, 2)
    valid = torch.zeros(1, 6, 1, 2, dtype=torch.bool)
    logits[0, 0, 0, 0], labels[0, 0, 0, 0], valid[0, 0, 0, 0] = 2.0, 1.0, True  # confident, right
    logits[0, 1, 0, 0], labels[0, 1, 0, 0], valid[0, 1, 0, 0] = 1.0, 0.0, True  # wrong side
    logits[0, 2, 0, 1], labels[0, 2, 0, 1] = 50.0, 0.0  # invalid: must not count
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(1.0))) / (2 * math.log(2))
    assert float(per_slot_bce_bits(logits, labels, valid)[0]) == pytest.approx(expected, rel=1e-6)
    assert bit_errors(logits, labels, valid).tolist() == [1]


def test_checkpoint_round_trip_gives_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = DeepRx(config_for("tiny")).eval()
    save_checkpoint(tmp_path / "m", model, {"steps": 0})
    loaded = load_checkpoint(tmp_path / "m")
    x, k = torch.randn(2, 10, 12, 14), torch.tensor([4, 4])
    torch.testing.assert_close(loaded.model(x, k), model(x, k))
    assert loaded.metadata["config"]["widths"] == list(model.config.widths)
    assert not list((tmp_path / "m").glob("*.tmp"))


def test_loading_something_that_is_not_a_checkpoint_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model checkpoint"):
        load_checkpoint(tmp_path)


def test_an_untrained_residual_model_is_exactly_ls_lmmse(train_mix_file):
    """Residual inputs: the correction starts at zero, so the untrained model makes LS-LMMSE's decisions."""
    from schema.dataset import read_slots
    from service.receiver.evaluate import evaluate

    slots, _ = read_slots(train_mix_file)
    torch.manual_seed(0)
    report = evaluate(DeepRx(config_for("small", inputs="residual")), slots)
    assert report.errors["deeprx"].tolist() == report.errors["ls_lmmse"].tolist()


def test_weighted_inputs_add_ls_lmmse_llrs_times_the_networks_weight(train_mix_file):
    """Weighted inputs: logits = the network's own + w * LS-LMMSE's LLRs, w a 1x1 convolution of the
    head's normalised features (its bias alone here: a constant weight); robust inputs add the robust
    estimate's LLRs times a second weight."""
    from schema.dataset import read_slots
    from service.receiver.features import llr_channels, prepare

    data = prepare(read_slots(train_mix_file, slice(0, 4))[0])
    rx = 2  # 0 for the bits a modulation lacks
    ls_llrs, robust_llrs = data.features[:, llr_channels(rx)], data.features[:, llr_channels(rx, "robust")]
    torch.manual_seed(0)
    model = DeepRx(config_for("tiny", inputs="weighted")).eval()
    own = model(data.features, data.bits_per_symbol)
    for weight in (0.25, 1.0, -0.5):
        with torch.no_grad():
            model.prior_weight.bias.fill_(weight)
        torch.testing.assert_close(model(data.features, data.bits_per_symbol), own + weight * ls_llrs)
    torch.manual_seed(0)
    model = DeepRx(config_for("tiny", inputs="robust")).eval()
    own = model(data.features, data.bits_per_symbol)
    with torch.no_grad():
        model.prior_weight.bias.fill_(0.25)
        model.robust_weight.bias.fill_(0.5)
    torch.testing.assert_close(model(data.features, data.bits_per_symbol), own + 0.25 * ls_llrs + 0.5 * robust_llrs)
