import torch

from schema.dataset import read_slots
from service.influence.curvature import CurvatureConfig
from service.influence.gradients import ParameterSpace
from service.influence.inverse import fit_curvature
from service.influence.learned import EstimatorConfig, InfluenceEstimator, slot_features, spearman
from service.influence.scores import normalised
from service.receiver.checkpoint import load_checkpoint
from service.receiver.features import prepare


def test_estimator_learns_influence_from_a_fraction_of_pairs(train_mix_file, high_snr_file, tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint).model
    pool = prepare(read_slots(train_mix_file)[0])
    targets = [prepare(read_slots(f, slice(s, s + 8))[0]) for f, s in
               ((high_snr_file, 0), (high_snr_file, 8), (train_mix_file, 0), (train_mix_file, 32))]
    space = ParameterSpace.convolutions(model)
    curvature = fit_curvature(space, pool, CurvatureConfig(method="ekfac"))
    gradients = space.per_sample_gradients(pool)
    exact = torch.stack([normalised("l-relative", space.mean_gradient(t), gradients, curvature) for t in targets])
    pool_features = slot_features(model, pool)
    target_features = torch.stack([slot_features(model, t).mean(0) for t in targets])
    assert pool_features.shape == (64, model.config.widths[-1] + 5)

    train_rows, held_out = slice(0, 24), slice(24, None)
    estimator = InfluenceEstimator(pool_features.shape[1], EstimatorConfig(epochs=300)).fit(
        pool_features[train_rows], target_features, exact[:, train_rows])
    predicted = torch.stack([estimator.predict(pool_features[held_out], t) for t in target_features])
    truth = exact[:, held_out]
    assert spearman(predicted, truth) > 0.5
    assert torch.mean((predicted - truth) ** 2) < torch.mean((truth - exact[:, train_rows].mean()) ** 2)
