"""Every registered model, through the factory only: a new architecture is tested with no new code."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from biometry.models import count_parameters, create_model, list_models, model_info, register_model

MODELS = list_models()
TINY = {"width": 4}  # tiny but default depth: fast on 2 CPU cores
SIZES = [(32, 48), (36, 52)]  # the second is no multiple of 2**depth: padded inside, cropped back


def test_registry_lists_the_three_architectures():
    assert MODELS == ["hrnet_compact", "unet", "unet_multihead"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("stride", [1, 2, 4])
@pytest.mark.parametrize("hw", SIZES)
def test_output_shape(name, stride, hw):
    model = create_model(name, output_stride=stride, **TINY).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, *hw))
    assert out.shape == (2, 4, hw[0] // stride, hw[1] // stride)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert model.output_stride == stride


@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_every_parameter(name):
    model = create_model(name, output_stride=2, **TINY)
    target = torch.rand(3, 4, 16, 24)
    loss = (model(torch.randn(3, 1, 32, 48)) - target).square().mean()
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_channels_last_gives_the_same_output(name):
    model = create_model(name, **TINY).eval()
    x = torch.randn(2, 1, 36, 52)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_autocast_bfloat16(name):
    model = create_model(name, **TINY).to(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 32, 48).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (2, 4, 32, 48)
    out.float().square().mean().backward()
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("name", MODELS)
def test_shared_options_and_batch_norm(name):
    model = create_model(name, in_channels=2, num_keypoints=4, width=4, depth=4, output_stride=4,
                         norm="batch")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert model(torch.randn(2, 2, 32, 48)).shape == (2, 4, 8, 12)


@pytest.mark.parametrize("name", MODELS)
def test_config_rebuilds_the_same_model(name):
    """``model.cfg`` as keyword arguments rebuilds a model that loads the same state dict."""
    model = create_model(name, **TINY)
    again = create_model(name, **dataclasses.asdict(model.cfg))
    again.load_state_dict(model.state_dict())
    assert again.cfg == model.cfg


@pytest.mark.parametrize("name", MODELS)
def test_model_info_and_default_size(name):
    info = model_info(name)
    assert info.name == name and info.summary
    for key in ("in_channels", "num_keypoints", "width", "depth", "output_stride", "norm"):
        assert key in info.defaults
    assert 300_000 <= info.num_params <= 1_200_000  # small by default: CPU trials stay fast
    tiny = create_model(name, **TINY)
    assert count_parameters(tiny) == sum(p.numel() for p in tiny.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_input_checks(name):
    model = create_model(name, output_stride=4, **TINY)
    with pytest.raises(ValueError, match=r"^input height and width must be divisible by "
                                         r"output_stride=4 but got \(34, 48\)\.$"):
        model(torch.zeros(1, 1, 34, 48))
    with pytest.raises(ValueError, match=r"^input must have shape \(B, 1, H, W\) but got "
                                         r"\(1, 3, 32, 48\)\.$"):
        model(torch.zeros(1, 3, 32, 48))


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError) as err:
        create_model("resnet")
    assert str(err.value) == "unknown model 'resnet'; choose one of: hrnet_compact, unet, unet_multihead"


def test_duplicate_registration_is_an_error():
    def unet(**kwargs):  # same name as the registered one
        raise AssertionError("never built")

    with pytest.raises(ValueError) as err:
        register_model(unet)
    assert str(err.value) == "model 'unet' is already registered."
    assert list_models() == MODELS
    assert create_model("unet", **TINY).__class__.__name__ == "UNet"


def test_unknown_option_names_the_choices():
    with pytest.raises(ValueError) as err:
        create_model("unet", widht=8)
    assert str(err.value) == (
        "unknown option 'widht' for model 'unet'; choose from: decoder_width, depth, in_channels, "
        "mask_head, norm, num_keypoints, output_stride, width"
    )


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("unet", {"width": 0}, "width must be a positive integer but got 0."),
        ("unet", {"width": 8.0}, "width must be an integer but got 8.0."),
        ("unet", {"depth": 7}, "depth must be in [2, 6] but got 7."),
        ("unet", {"output_stride": 3}, "output_stride must be one of 1, 2, 4 but got 3."),
        ("unet", {"norm": "layer"}, "norm must be one of 'batch', 'group' but got 'layer'."),
        ("unet", {"decoder_width": 0}, "decoder_width must be positive but got 0."),
        ("unet_multihead", {"num_keypoints": 2},
         "unet_multihead makes 4 heatmaps (BPD1, BPD2, OFD1, OFD2) but got num_keypoints=2."),
        ("hrnet_compact", {"branches": 5}, "branches must be in [2, 4] but got 5."),
        ("hrnet_compact", {"stem_stride": 8}, "stem_stride must be 2 or 4 but got 8."),
        ("hrnet_compact", {"stages": 0}, "stages must be a positive integer but got 0."),
        ("hrnet_compact", {"depth": 6}, "depth must be in [3, 5] for stem_stride=4 but got 6."),
        ("hrnet_compact", {"depth": 4, "branches": 2},
         "depth must equal log2(stem_stride) + branches - 1 = 3 but got 4; give only one of depth "
         "and branches."),
    ],
)
def test_option_validation_messages(name, kwargs, message):
    with pytest.raises(ValueError) as err:
        create_model(name, **kwargs)
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("kwargs", "depth", "branches"),
    [({}, 4, 3), ({"depth": 5}, 5, 4), ({"branches": 2}, 3, 2), ({"stem_stride": 2}, 3, 3),
     ({"stem_stride": 2, "depth": 4}, 4, 4), ({"depth": 4, "branches": 3}, 4, 3)],
)
def test_hrnet_depth_and_branches_follow_each_other(kwargs, depth, branches):
    model = create_model("hrnet_compact", width=4, **kwargs)
    assert (model.cfg.depth, model.cfg.branches) == (depth, branches)
    assert model.pad_multiple == 2**depth


def test_multihead_concatenates_bpd_then_ofd():
    model = create_model("unet_multihead", **TINY).eval()
    with torch.no_grad():
        model.decoders[1].head.bias.fill_(100.0)  # the OFD decoder
        out = model(torch.zeros(1, 1, 32, 48))
    assert (out[:, 2:] > 50).all() and (out[:, :2].abs() < 50).all()


def test_down_conv_keeps_the_codec_pixel_centres():
    """Averaging 4x4 stride-2 convs on an x-ramp: pixel j at stride s sits at j * s + (s - 1) / 2."""
    from biometry.models.blocks import down_conv

    x = torch.arange(64, dtype=torch.float32).expand(1, 1, 16, 64)
    for stride in (2, 4):
        conv = down_conv(1, 1)[0]
        torch.nn.init.constant_(conv.weight, 1 / 16)
        x = conv(x).detach()
        j = torch.arange(1, x.shape[-1] - 1, dtype=torch.float32)  # interior (zero padding aside)
        torch.testing.assert_close(x[0, 0, 1, 1:-1], j * stride + (stride - 1) / 2)


@pytest.mark.parametrize("name", MODELS)
def test_a_few_steps_fit_a_fixed_batch(name):
    torch.manual_seed(0)
    model = create_model(name, output_stride=4, **TINY)
    x, target = torch.randn(2, 1, 32, 48), torch.rand(2, 4, 8, 12)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = (model(x) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("name", MODELS)
def test_mask_head_adds_one_channel_after_the_heatmaps(name):
    from biometry.models import split_mask

    torch.manual_seed(0)
    plain = create_model(name, **TINY)
    masked = create_model(name, **TINY, mask_head=True)
    x = torch.randn(2, 1, *SIZES[0])
    out = masked(x)
    assert out.shape[1] == 5 and plain(x).shape[1] == 4
    heatmaps, logits = split_mask(out)
    assert heatmaps.shape == (2, 4, *out.shape[-2:]) and logits.shape == (2, *out.shape[-2:])
    assert split_mask(plain(x))[1] is None
    (heatmaps.sum() + logits.sum()).backward()  # the mask channel is part of the graph
    with pytest.raises(ValueError, match="mask_head must be True or False"):
        create_model(name, **TINY, mask_head="yes")


def test_split_mask_refuses_a_wrong_channel_count():
    from biometry.models import split_mask

    with pytest.raises(ValueError, match="4 heatmaps and at most one mask channel but got 6"):
        split_mask(torch.zeros(1, 6, 4, 4))
