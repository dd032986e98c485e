"""Ensembles of one recipe's seeds (biometry.models.ensemble, biometry.inference.ensemble_of): the
output maps averaged or the median of the members' landmarks, the folder saves and loads like any
model (weights_only), and members of different recipes (another split or output layout) are
refused in one line naming the folder."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from biometry.errors import BiometryInputError
from biometry.inference import (
    LandmarkPredictor,
    ModelSpec,
    ensemble_of,
    load_model_folder,
    match_pairs,
    median_of,
    save_model_folder,
)
from biometry.models import ENSEMBLE_COMBINES, MeanOfModels, create_ensemble, create_model

KWARGS = {"width": 4, "depth": 2, "output_stride": 2}


def member_folder(folder: Path, *, seed: int, **changes) -> Path:
    torch.manual_seed(seed)
    spec = ModelSpec(architecture="unet", model_kwargs=dict(KWARGS), input_hw=(32, 48), stride=2,
                     sigma=2.0, softargmax_beta=20.0,
                     orientation={"bpd_direction": [0.0, 1.0], "ofd_direction": [1.0, 0.0]},
                     data={"source": str(folder.parent), "split_seed": 0},
                     trial_config={"train": {"seed": seed}}, metrics={"val_measure_l1_mm": 1.0})
    return save_model_folder(folder, create_model("unet", **KWARGS), replace(spec, **changes))


def test_the_ensemble_averages_the_members_output_maps():
    torch.manual_seed(0)
    members = [create_model("unet", **KWARGS).eval() for _ in range(2)]
    x = torch.randn(2, 1, 32, 48)
    with torch.no_grad():
        expected = 0.5 * (members[0](x) + members[1](x))
        assert torch.allclose(MeanOfModels(members)(x), expected, atol=1e-6)


def test_an_ensemble_folder_saves_and_loads_like_any_model(tmp_path):
    folders = [member_folder(tmp_path / f"seed{s}", seed=s) for s in (3, 4)]
    model, spec = ensemble_of(folders)
    assert spec.architecture == "ensemble"
    assert [m["seed"] for m in spec.model_kwargs["members"]] == [3, 4]
    assert spec.input_hw == (32, 48) and spec.stride == 2
    save_model_folder(tmp_path / "final", model, spec)
    loaded, loaded_spec = load_model_folder(tmp_path / "final")
    assert isinstance(loaded, MeanOfModels) and loaded_spec.model_kwargs == spec.model_kwargs
    x = torch.randn(1, 1, 32, 48)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
    coords, uncertainty = LandmarkPredictor.from_folder(tmp_path / "final").predict(
        [np.random.default_rng(0).integers(0, 255, (60, 90), dtype=np.uint8)])
    assert coords.shape == (1, 4, 2) and np.isfinite(coords).all() and uncertainty.shape == (1,)


def images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (60, 90), dtype=np.uint8) for _ in range(n)]


def test_a_median_ensemble_predicts_the_median_of_its_members_landmarks(tmp_path):
    folders = [member_folder(tmp_path / f"seed{s}", seed=s) for s in (3, 4, 5)]
    model, spec = ensemble_of(folders, combine="median")
    assert spec.combine == "median" and "combine" not in spec.model_kwargs
    save_model_folder(tmp_path / "final", model, spec)
    predictor = LandmarkPredictor.from_folder(tmp_path / "final")
    assert predictor.spec.combine == "median" and len(predictor.members) == 3
    batch = images(4)
    coords, uncertainty = predictor.predict(batch, batch_size=3)
    alone = [LandmarkPredictor.from_folder(folder).predict(batch) for folder in folders]
    matched = np.stack([match_pairs(c, alone[0][0]) for c, _ in alone])
    np.testing.assert_allclose(coords, np.median(matched, axis=0), atol=1e-4)
    np.testing.assert_allclose(uncertainty, np.median([u for _, u in alone], axis=0), rtol=1e-5)
    # the same members averaged as maps predict otherwise
    maps, _ = LandmarkPredictor(*ensemble_of(folders, combine="maps")).predict(batch)
    assert not np.allclose(maps, coords, atol=1e-3)


def test_the_median_outvotes_one_members_miss():
    truth = np.array([[[10.0, 0.0], [10.0, 20.0], [0.0, 10.0], [30.0, 10.0]]])
    near = truth + 0.5
    miss = truth + 40.0
    swapped = near[:, [1, 0, 3, 2]]  # a member that ordered both pairs the other way
    coords, uncertainty = median_of([(truth, np.array([1.0])), (miss, np.array([9.0])),
                                     (swapped, np.array([2.0]))])
    np.testing.assert_allclose(coords, near)
    assert uncertainty.tolist() == [2.0]


def test_members_must_share_the_split_and_the_output_layout(tmp_path):
    a = member_folder(tmp_path / "a", seed=0)
    written_otherwise = member_folder(tmp_path / "b", seed=1,
                                      data={"source": str(tmp_path / "x" / ".."), "split_seed": 0})
    ensemble_of([a, written_otherwise])  # one data folder, written two ways
    other_split = member_folder(tmp_path / "c", seed=1,
                                data={"source": str(tmp_path), "split_seed": 1})
    with pytest.raises(BiometryInputError, match=r"c/model.yaml: 'data' differs from .*a/model."
                                                 r"yaml; the members of an ensemble share it$"):
        ensemble_of([a, other_split])
    with pytest.raises(BiometryInputError, match=r"d/model.yaml: 'stride' differs"):
        ensemble_of([a, member_folder(tmp_path / "d", seed=1, stride=4)])
    model, spec = ensemble_of([a, written_otherwise])
    save_model_folder(tmp_path / "e", model, spec)
    with pytest.raises(BiometryInputError, match=r"e/model.yaml: an ensemble member cannot "
                                                 r"itself be an ensemble"):
        ensemble_of([a, tmp_path / "e"])
    with pytest.raises(BiometryInputError, match="an ensemble needs at least one model folder"):
        ensemble_of([])
    with pytest.raises(BiometryInputError, match=r"ensemble combine must be one of \('maps', "
                                                 r"'median'\) but got 'vote'"):
        ensemble_of([a], combine="vote")


def test_the_driver_knows_the_ensemble_combines_without_importing_torch():
    from search.cli import FINAL_COMBINES, SearchSettings

    assert FINAL_COMBINES == ENSEMBLE_COMBINES
    assert SearchSettings().final_combine == "median"


def test_bad_ensemble_options_name_the_member():
    with pytest.raises(ValueError, match="'members' must be a non-empty list"):
        create_ensemble([])
    with pytest.raises(ValueError, match="ensemble member 1 must name its 'architecture'"):
        create_ensemble([{"architecture": "unet"}, {"model_kwargs": {}}])
    with pytest.raises(ValueError, match="unknown model 'vit'"):
        create_ensemble([{"architecture": "vit"}])
