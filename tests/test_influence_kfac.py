"""K-FAC / EK-FAC on a tiny DeepRx (depthwise, pointwise and 3x3 convolutions): the fast
eigenbasis solve equals inverting the dense Kronecker construction, and the factors approximate
the true curvature."""
import pytest
import torch

from schema.dataset import read_slots
from service.influence.curvature import CurvatureConfig
from service.influence.gradients import ParameterSpace
from service.influence.inverse import fit_curvature
from service.receiver.features import prepare
from service.receiver.model import DeepRx, config_for


@pytest.fixture(scope="module", params=["grid", "weighted", "robust"])
def tiny(train_mix_file, request):
    torch.manual_seed(0)
    model = DeepRx(config_for("tiny", inputs=request.param)).double().eval()
    if model.prior_weight is not None:  # LS-LMMSE's LLRs reach the loss through the weight
        torch.nn.init.constant_(model.prior_weight.bias, 0.5)
    if model.robust_conv is not None:  # and the robust estimate's channels and LLRs through theirs
        torch.nn.init.normal_(model.robust_conv.weight, std=0.1)
        torch.nn.init.constant_(model.robust_weight.bias, 0.5)
    slots, _ = read_slots(train_mix_file, slice(0, 12))
    data = prepare(slots)
    data.features, data.labels = data.features.double(), data.labels.double()
    return ParameterSpace.convolutions(model), data


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_fast_solve_equals_dense_kronecker_inverse(tiny, method):
    space, data = tiny
    curvature = fit_curvature(space, data, CurvatureConfig(method=method, damping=1e-3))
    assert any(layer.groups > 1 for layer in curvature.layers), "depthwise convolutions are factored"
    vectors = torch.randn(4, space.size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = torch.linalg.solve(curvature.dense(), vectors.T).T
    got = curvature.solve(vectors)
    assert float((got - expected).norm() / expected.norm()) < 1e-8


def test_factors_are_symmetric_psd_and_ekfac_keeps_the_kfac_basis(tiny):
    space, data = tiny
    kfac = fit_curvature(space, data, CurvatureConfig(method="kfac", damping=1e-3))
    ekfac = fit_curvature(space, data, CurvatureConfig(method="ekfac", damping=1e-3))
    for k_layer, e_layer in zip(kfac.layers, ekfac.layers):
        for cov in (k_layer.activation_cov, k_layer.gradient_cov):
            torch.testing.assert_close(cov, cov.transpose(1, 2))
            assert torch.linalg.eigvalsh(cov).min() > -1e-10
        torch.testing.assert_close(k_layer.activation_cov, e_layer.activation_cov)
        assert torch.all(e_layer.corrected >= 0)


def test_ekfac_tracks_the_gauss_newton_better_than_identity(tiny):
    """Quadratic forms v^T H v of EK-FAC correlate with the exact GGN's across random directions."""
    space, data = tiny
    ekfac = fit_curvature(space, data, CurvatureConfig(method="ekfac", damping=0.0))
    dense = ekfac.dense()
    probes = space.per_sample_gradients(data)  # realistic directions: per-sample gradients
    exact = (probes * space.ggn_vector_product(data, probes)).sum(1)
    approx = (probes * (probes @ dense)).sum(1)
    correlation = torch.corrcoef(torch.stack([exact, approx]))[0, 1]
    assert correlation > 0.8, float(correlation)
