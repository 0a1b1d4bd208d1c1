import pytest
import torch

from schema.dataset import read_slots
from service.influence.curvature import CurvatureConfig
from service.influence.gradients import ParameterSpace
from service.influence.index import GradientIndex, IndexConfig, StaleIndexError
from service.influence.inverse import fit_curvature
from service.influence.scores import normalised
from service.receiver.checkpoint import load_checkpoint
from service.receiver.features import prepare


@pytest.fixture(scope="module")
def setting(train_mix_file, high_snr_file, tiny_checkpoint):
    pool, _ = read_slots(train_mix_file)
    targets, _ = read_slots(high_snr_file, slice(0, 8))
    ids = [f"p{i}" for i in range(len(pool))]
    return load_checkpoint(tiny_checkpoint).model, pool, targets, ids


def test_exact_index_reproduces_direct_scores(setting, tmp_path):
    model, pool, targets, ids = setting
    config = IndexConfig(CurvatureConfig(method="ekfac", damping=1e-3), compression=None)
    index = GradientIndex(tmp_path / "index")
    index.build(model, "v1", pool, ids, fit_ids=ids[:32], config=config, progress=False)
    result = index.query(model, "v1", targets, k=len(pool), score="l-relative")

    space = ParameterSpace.convolutions(model)
    curvature = fit_curvature(space, prepare(pool.select(slice(0, 32))), config.curvature)
    direct = normalised("l-relative", space.mean_gradient(prepare(targets)),
                        space.per_sample_gradients(prepare(pool)), curvature)
    expected_order = [ids[i] for i in torch.argsort(direct).tolist()]
    assert result.slot_ids[:10] == expected_order[:10]
    torch.testing.assert_close(result.scores, torch.sort(direct).values.float(), rtol=1e-3, atol=1e-6)


def test_extend_adds_only_new_slots_and_matches_a_full_build(setting, tmp_path):
    model, pool, targets, ids = setting
    config = IndexConfig(CurvatureConfig(method="kfac", damping=1e-3), compression="sjlt:512")
    grown = GradientIndex(tmp_path / "grown")
    grown.build(model, "v1", pool.select(slice(0, 40)), ids[:40], fit_ids=ids[:16], config=config, progress=False)
    added = grown.extend(model, "v1", pool, ids, fit=pool.select(slice(0, 16)), progress=False)
    assert added == 24 and grown.slot_ids() == ids and len(grown.manifest["shards"]) == 2
    assert grown.extend(model, "v1", pool, ids, fit=pool.select(slice(0, 16)), progress=False) == 0

    full = GradientIndex(tmp_path / "full")
    full.build(model, "v1", pool, ids, fit_ids=ids[:16], config=config, progress=False)
    a, b = grown.query(model, "v1", targets, 20), full.query(model, "v1", targets, 20)
    assert a.slot_ids == b.slot_ids
    torch.testing.assert_close(a.scores, b.scores)


def test_index_is_stale_after_a_swap(setting, tmp_path):
    model, pool, targets, ids = setting
    index = GradientIndex(tmp_path / "index")
    index.build(model, "v1", pool.select(slice(0, 16)), ids[:16], fit_ids=ids[:8],
                config=IndexConfig(CurvatureConfig(method="identity"), compression="mask:0.5"), progress=False)
    assert not index.is_stale("v1") and index.is_stale("v2")
    with pytest.raises(StaleIndexError, match="rebuild"):
        index.query(model, "v2", targets, 5)
    with pytest.raises(StaleIndexError):
        index.extend(model, "v2", pool, ids, fit=pool.select(slice(0, 8)), progress=False)
    reopened = GradientIndex(tmp_path / "index")
    assert reopened.model_version() == "v1" and len(reopened.slot_ids()) == 16
