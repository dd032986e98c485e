"""benchmarks/seed_spread.py: the seeds' ensemble averages their output maps, and seeds of
different recipes (another split or output layout) are refused in one line."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from benchmarks.seed_spread import MeanOfModels, check_members
from biometry.errors import BiometryInputError
from biometry.inference import ModelSpec
from biometry.models import create_model


def test_the_ensemble_averages_the_members_output_maps():
    torch.manual_seed(0)
    members = [create_model("unet", width=4, depth=2).eval() for _ in range(2)]
    x = torch.randn(2, 1, 32, 48)
    with torch.no_grad():
        expected = 0.5 * (members[0](x) + members[1](x))
        assert torch.allclose(MeanOfModels(members)(x), expected, atol=1e-6)


def test_members_must_share_the_split_and_the_output_layout(tmp_path):
    spec = ModelSpec(architecture="unet", model_kwargs={}, input_hw=(32, 48), stride=2, sigma=2.0,
                     softargmax_beta=20.0, orientation={},
                     data={"source": str(tmp_path), "split_seed": 0})
    relative = replace(spec, data={"source": str(tmp_path / "x" / ".."), "split_seed": 0})
    check_members(["a", "b"], [spec, relative])  # one folder, written two ways
    with pytest.raises(BiometryInputError, match=r"^b/model.yaml: 'data' differs from a's"):
        check_members(["a", "b"], [spec, replace(spec, data={**spec.data, "split_seed": 1})])
    with pytest.raises(BiometryInputError, match=r"^b/model.yaml: 'stride' differs"):
        check_members(["a", "b"], [spec, replace(spec, stride=4)])
