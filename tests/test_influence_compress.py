import json

import pytest
import torch

from service.cli import main as service_main
from service.influence.compress import Compressor


def _correlated(n=64, p=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(p, generator=g, dtype=torch.float64)
    pool = 0.3 * base + torch.randn(n, p, generator=g, dtype=torch.float64)
    return base, pool


@pytest.mark.parametrize("spec", ["mask:0.3", "gauss:512", "sjlt:512"])
def test_sketches_preserve_inner_products_on_average(spec):
    target, pool = _correlated()
    exact = pool @ target
    estimates = torch.stack([Compressor.parse(spec, seed)(pool) @ Compressor.parse(spec, seed)(target)
                             for seed in range(40)])
    bias = (estimates.mean(0) - exact).abs().mean() / exact.abs().mean()
    assert bias < 0.1, f"{spec}: relative bias {bias:.3f}"
    assert Compressor.parse(spec).output_dim(3000) == (900 if spec.startswith("mask") else 512)


def test_full_mask_is_the_identity_and_sketches_are_deterministic():
    _, pool = _correlated()
    torch.testing.assert_close(Compressor.parse("mask:1")(pool), pool)
    for spec in ("mask:0.1", "gauss:64", "sjlt:64"):
        torch.testing.assert_close(Compressor.parse(spec, 3)(pool), Compressor.parse(spec, 3)(pool))


def test_larger_sketches_preserve_the_ranking_better():
    g = torch.Generator().manual_seed(5)
    target = torch.randn(4000, generator=g, dtype=torch.float64)
    # pool samples align with the target to different degrees, as gradients of related slots do
    pool = torch.randn(200, 1, generator=g, dtype=torch.float64) * target + torch.randn(200, 4000, generator=g,
                                                                                          dtype=torch.float64)
    exact = torch.argsort(torch.argsort(pool @ target)).double()

    def spearman(spec):
        c = Compressor.parse(spec)
        approx = torch.argsort(torch.argsort(c(pool) @ c(target))).double()
        return torch.corrcoef(torch.stack([exact, approx]))[0, 1]

    for kind in ("sjlt", "gauss"):
        assert spearman(f"{kind}:64") < spearman(f"{kind}:2048")
        assert spearman(f"{kind}:2048") > 0.9


@pytest.mark.parametrize("spec", ["mask", "mask:0", "mask:1.5", "gauss:0", "sjlt:1.5", "pca:10"])
def test_bad_compression_specs_are_refused(spec):
    with pytest.raises(ValueError):
        Compressor.parse(spec)


def test_cli_compressed_ranking_agrees_with_exact(train_mix_file, high_snr_file, tiny_checkpoint, capsys):
    def top(extra):
        assert service_main(["influence", "--model", str(tiny_checkpoint), "--pool", str(train_mix_file),
                             "--targets", str(high_snr_file), "--method", "identity", "--score", "raw",
                             "--top", "64", "--json", *extra]) == 0
        return [row["index"] for row in json.loads(capsys.readouterr().out)["top"]]

    exact, sketched = top([]), top(["--compress", "sjlt:4096"])
    assert len(set(exact[:10]) & set(sketched[:10])) >= 7


@pytest.mark.parametrize("products,padding,inputs", [(0, "zeros", "grid"), (2, "zeros", "grid"),
                                                     (2, "replicate", "grid"), (0, "zeros", "weighted"),
                                                     (0, "zeros", "robust")])
def test_per_layer_masked_gradients_equal_the_kept_coordinates_of_dense_ones(train_mix_file, products, padding,
                                                                            inputs):
    from schema.dataset import read_slots
    from service.influence.gradients import ParameterSpace
    from service.receiver.features import prepare
    from service.receiver.model import DeepRx, DeepRxConfig

    torch.manual_seed(0)  # two blocks: dilated depthwise 3x3, 1x1 pointwise, a 1x1 skip, and the matched filter
    model = DeepRx(DeepRxConfig((8, 12), ((1, 1), (2, 3)), 2, products, 0, inputs, padding)).double().eval()
    if model.prior_weight is not None:  # so gradients flow through both factors of the LLR term
        torch.nn.init.constant_(model.prior_weight.bias, 0.5)
    data = prepare(read_slots(train_mix_file, slice(0, 5))[0])
    data.features, data.labels = data.features.double(), data.labels.double()
    space = ParameterSpace.convolutions(model)
    dense = space.per_sample_gradients(data, chunk=2)
    for fraction in (0.005, 0.05, 1.0):  # elementwise path, mixed, per-layer dense path
        kept = Compressor.parse(f"mask:{fraction}", seed=1).kept(space.size)
        masked = space.masked_per_sample_gradients(data, kept, chunk=2)
        torch.testing.assert_close(masked, dense[:, kept], rtol=1e-9, atol=1e-12)


def test_raw_mask_scores_from_per_layer_gradients_equal_the_dense_path(train_mix_file, high_snr_file, tiny_checkpoint):
    from schema.dataset import read_slots
    from service.influence.curvature import CurvatureConfig
    from service.influence.engine import InfluenceConfig, compressed_scores, rank_pool
    from service.influence.gradients import ParameterSpace
    from service.influence.inverse import fit_curvature
    from service.receiver.checkpoint import load_checkpoint
    from service.receiver.features import prepare

    model = load_checkpoint(tiny_checkpoint).model.eval()
    pool, targets = read_slots(train_mix_file, slice(0, 40))[0], read_slots(high_snr_file, slice(0, 4))[0]
    config = InfluenceConfig(CurvatureConfig(method="identity"), score="raw", compression="mask:0.2")
    fast = rank_pool(model, pool, targets, config).scores
    space = ParameterSpace.convolutions(model)
    pool_data = prepare(pool)
    dense = compressed_scores("raw", Compressor.parse("mask:0.2"), space.mean_gradient(prepare(targets)),
                              space.per_sample_gradients(pool_data), fit_curvature(space, pool_data, config.curvature))
    torch.testing.assert_close(fast, dense, rtol=1e-4, atol=1e-7)
