"""Head-size balanced sampling of the training split (``train.balance_head_size``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from biometry.errors import BiometryInputError
from biometry.geometry import ellipse_landmarks
from biometry.metrics import measurements_mm
from trainables.config import config_from_dict
from trainables.data import PreparedImages, head_size_weights, prepare_splits
from trainables.train import OBJECTIVE, make_loader, run_trial
from tests.test_trainable import tiny_config


def split_of_heads(ofd_px: list[float]) -> PreparedImages:
    """Heads of the given OFD (pixels, 1 mm spacing, BPD = 0.8 OFD) on blank images."""
    n = len(ofd_px)
    original = np.stack([ellipse_landmarks((400, 270), (ofd, 0.8 * ofd), 10.0) for ofd in ofd_px])
    return PreparedImages(images=np.zeros((n, 8, 12), np.uint8), landmarks=original.astype(np.float32),
                          original=original, letterbox=np.tile([1.0, 0.0, 0.0], (n, 1)),
                          pixel_mm=np.ones(n), names=[f"{i:03d}_HC.png" for i in range(n)],
                          subjects=[f"{i:03d}" for i in range(n)])


# a split like HC18's: many mid-gestation heads, few early and late ones
HEADS = split_of_heads([20.0] * 4 + [40.0] * 8 + [60.0] * 40 + [90.0] * 8)


def bin_totals(images: PreparedImages, weights: np.ndarray) -> dict[int, float]:
    hc = measurements_mm(images.original, images.pixel_mm)["hc"].round().astype(int)
    return {int(size): float(weights[hc == size].sum()) for size in np.unique(hc)}


def test_power_zero_keeps_the_split_as_it_is():
    np.testing.assert_allclose(head_size_weights(HEADS, power=0.0), 1.0)


def test_power_one_draws_every_head_size_equally_often():
    weights = head_size_weights(HEADS, power=1.0)
    assert weights.mean() == pytest.approx(1.0)
    totals = list(bin_totals(HEADS, weights).values())
    np.testing.assert_allclose(totals, totals[0])


def test_half_power_raises_rare_sizes_without_equalising_them():
    weights = head_size_weights(HEADS, power=0.5)
    totals = bin_totals(HEADS, weights)
    smallest, common = min(totals), sorted(totals)[2]
    assert 4 / 60 < totals[smallest] / weights.sum() < 0.25
    assert totals[common] > totals[smallest]


def test_power_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="power must be in"):
        head_size_weights(HEADS, power=1.5)
    with pytest.raises(BiometryInputError, match="'train.balance_head_size' must be in"):
        config_from_dict({"train": {"balance_head_size": -0.1}}, source="x.yaml")


class Indices(Dataset):
    def __len__(self) -> int:
        return 60

    def __getitem__(self, index: int) -> int:
        return index


def draws(loader) -> np.ndarray:
    return torch.cat(list(loader)).numpy()


def test_weighted_loader_follows_the_weights_and_repeats_after_reseeding():
    weights = np.ones(60)
    weights[:4] = 30.0  # four images hold two thirds of the weight
    loader = make_loader(Indices(), batch_size=10, shuffle=True, num_workers=0, seed=3,
                         pin_memory=False, weights=weights)
    loader.generator.manual_seed(7)
    first = draws(loader)
    assert len(first) == 60 and np.isin(first, np.arange(4)).mean() > 0.5
    loader.generator.manual_seed(7)
    np.testing.assert_array_equal(draws(loader), first)
    loader.generator.manual_seed(8)
    assert not np.array_equal(draws(loader), first)


def test_unweighted_loader_is_still_a_permutation():
    loader = make_loader(Indices(), batch_size=10, shuffle=True, num_workers=0, seed=3,
                         pin_memory=False)
    np.testing.assert_array_equal(np.sort(draws(loader)), np.arange(60))


def test_balanced_training_is_repeatable(synthetic_csv, tmp_path):
    cfg = tiny_config(synthetic_csv, epochs=1, balance_head_size=1.0)
    data = prepare_splits(cfg.data)
    first = run_trial(cfg, data=data, out_dir=tmp_path / "1", log=lambda _: None)
    second = run_trial(cfg, data=data, out_dir=tmp_path / "2", log=lambda _: None)
    assert np.isfinite(first[OBJECTIVE])
    assert first[OBJECTIVE] == pytest.approx(second[OBJECTIVE], rel=1e-6)
