"""Letterbox, augmentation (a dot drawn at a landmark stays under it), z-score, orientation."""
from __future__ import annotations

import warnings

import albumentations as A
import numpy as np
import pytest
import yaml

from biometry.errors import BiometryInputError
from biometry.transforms import (
    DEFAULT_INPUT_HW,
    AugmentConfig,
    Letterbox,
    Orientation,
    augment,
    augmentation_steps,
    build_augmentation,
    letterbox,
    zoom_to,
    zscore,
)

HW = (272, 400)
TOLERANCE_PX = 0.5  # a flip that maps x to w - x instead of w - 1 - x is 1 px off
LANDMARKS = np.array([[195.3, 100.6], [203.8, 171.2], [142.4, 139.1], [261.7, 131.5]])


def draw_dots(hw: tuple[int, int], points: np.ndarray, sigma: float = 1.2) -> np.ndarray:
    """uint8 image, 0 but for a small Gaussian dot (peak 255) at each (sub-pixel) point."""
    yy, xx = np.mgrid[: hw[0], : hw[1]]
    image = np.zeros(hw)
    for x, y in points:
        image = np.maximum(image, 255 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)))
    return np.round(image).astype(np.uint8)


def dot_centres(image: np.ndarray, near: np.ndarray, radius: int = 4) -> np.ndarray:
    """Intensity centroid of the dot near each point (window floor and 20% of its peak removed)."""
    values = image.astype(np.float64)
    out = []
    for x, y in near:
        cx, cy = int(round(x)), int(round(y))
        y0, x0 = max(cy - radius, 0), max(cx - radius, 0)
        window = values[y0 : cy + radius + 1, x0 : cx + radius + 1]
        window = window - np.median(window)
        assert window.max() > 20, f"no dot near ({x:.1f}, {y:.1f})"
        weights = np.clip(window - 0.2 * window.max(), 0, None)
        wy, wx = np.mgrid[: window.shape[0], : window.shape[1]]
        out.append([x0 + (weights * wx).sum() / weights.sum(), y0 + (weights * wy).sum() / weights.sum()])
    return np.array(out)


# -------------------------------------------------------------------------------------------------
# letterbox and z-score
# -------------------------------------------------------------------------------------------------


def test_default_input_keeps_the_hc18_aspect():
    image = draw_dots((540, 800), LANDMARKS * 2)
    boxed, points, box = letterbox(image, LANDMARKS * 2, DEFAULT_INPUT_HW)
    assert boxed.shape == DEFAULT_INPUT_HW and boxed.dtype == np.uint8
    assert box.scale == 0.5
    assert boxed[270:].max() == 0
    assert DEFAULT_INPUT_HW[0] % 16 == 0 and DEFAULT_INPUT_HW[1] % 16 == 0


@pytest.mark.parametrize("src_hw", [(540, 800), (333, 517), (541, 799), (200, 150), (100, 150)])
def test_letterbox_dots_stay_under_their_landmarks(src_hw):
    points = LANDMARKS * np.array([src_hw[1] / 400, src_hw[0] / 272])
    image = draw_dots(src_hw, points, sigma=2.0)
    boxed, mapped, box = letterbox(image, points, HW)
    assert boxed.shape == HW
    h, w = (round(src_hw[0] * box.scale), round(src_hw[1] * box.scale))
    assert (h == HW[0] or w == HW[1]) and h <= HW[0] and w <= HW[1]
    assert boxed[h:].max(initial=0) == 0 and boxed[:, w:].max(initial=0) == 0
    radius = int(np.ceil(6 * max(box.scale, 1.0)))
    np.testing.assert_allclose(dot_centres(boxed, mapped, radius), mapped, atol=0.1)
    np.testing.assert_allclose(box.to_original(mapped), points, atol=1e-9)


def test_letterbox_without_landmarks():
    _, points, box = letterbox(np.zeros((50, 60), np.uint8), None, (32, 32))
    assert points is None and isinstance(box, Letterbox)


def test_letterbox_round_trip_and_pixel_centres():
    box = Letterbox(scale=0.5, pad_x=-0.25, pad_y=-0.25)
    np.testing.assert_allclose(box.to_input([[0.5, 1.5]]), [[0.0, 0.5]])
    pts = np.random.default_rng(0).uniform(0, 500, (3, 4, 2))
    np.testing.assert_allclose(box.to_original(box.to_input(pts)), pts)


@pytest.mark.parametrize(
    "image, input_hw, message",
    [
        (np.zeros((10, 10), np.float32), (32, 32),
         "image must be a 2-D uint8 array but got shape (10, 10) and dtype float32."),
        (np.zeros((10, 10, 3), np.uint8), (32, 32),
         "image must be a 2-D uint8 array but got shape (10, 10, 3) and dtype uint8."),
        (np.zeros((10, 10), np.uint8), (0, 32),
         "input_hw must be two positive integers (height, width) but got (0, 32)."),
    ],
)
def test_letterbox_validation(image, input_hw, message):
    with pytest.raises(ValueError) as info:
        letterbox(image, None, input_hw)
    assert str(info.value) == message


def test_zscore():
    image = np.random.default_rng(0).integers(0, 255, (20, 30), dtype=np.uint8)
    z = zscore(image)
    assert z.dtype == np.float32 and z.shape == image.shape
    assert abs(float(z.mean())) < 1e-5 and float(z.std()) == pytest.approx(1.0, abs=1e-4)
    flat = zscore(np.full((4, 4), 7, np.uint8))
    assert np.all(flat == 0) and flat.dtype == np.float32


# -------------------------------------------------------------------------------------------------
# augmentation
# -------------------------------------------------------------------------------------------------

STRONG = AugmentConfig(
    rotate_deg=45.0, scale_min=0.7, scale_max=1.3, translate_frac=0.1, affine_p=1.0,
    hflip_p=1.0, vflip_p=1.0, brightness=0.2, contrast=0.2, gamma_min=0.5, gamma_max=2.0,
    noise_std=0.05, blur_sigma=1.5, intensity_p=1.0,
)
STEPS = augmentation_steps(STRONG)


def alone(step) -> A.Compose:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Got processor for keypoints")
        return A.Compose([step], keypoint_params=A.KeypointParams(format="xy", remove_invisible=False))


def test_strong_config_exercises_every_step():
    names = [type(s).__name__ for s in STEPS]
    assert names == ["Affine", "HorizontalFlip", "VerticalFlip", "RandomBrightnessContrast",
                     "RandomGamma", "GaussNoise", "GaussianBlur"]


@pytest.mark.parametrize("step", STEPS, ids=[type(s).__name__ for s in STEPS])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dot_stays_under_its_landmark_through_each_step(step, seed):
    image = draw_dots(HW, LANDMARKS)
    out_image, out_points = augment(alone(step), image, LANDMARKS, seed=seed)
    assert out_image.shape == HW and out_image.dtype == np.uint8
    assert np.abs(dot_centres(out_image, out_points) - out_points).max() < TOLERANCE_PX


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("config", ["strong", "zoom_mix"])
def test_dot_stays_under_its_landmark_through_the_whole_pipeline(seed, config):
    image = draw_dots(HW, LANDMARKS)
    cfg = {"strong": STRONG, "zoom_mix": ZOOM_MIX}[config]
    out_image, out_points = augment(build_augmentation(cfg), image, LANDMARKS, seed=seed)
    assert np.abs(dot_centres(out_image, out_points) - out_points).max() < TOLERANCE_PX


def test_flips_follow_the_pixel_centre_convention():
    aug = build_augmentation(AugmentConfig(**{**AugmentConfig.off().to_dict(), "hflip_p": 1.0, "vflip_p": 1.0}))
    _, points = augment(aug, np.zeros(HW, np.uint8), np.array([[0.0, 0.0], [-3.0, 300.0]]))
    np.testing.assert_allclose(points, [[HW[1] - 1, HW[0] - 1], [HW[1] + 2, HW[0] - 301]])


def test_same_seed_same_result_and_seeds_differ():
    aug = build_augmentation(AugmentConfig())
    image = draw_dots(HW, LANDMARKS)
    first = augment(aug, image, LANDMARKS, seed=(7, 0, 3))
    augment(aug, image, LANDMARKS)
    again = augment(build_augmentation(AugmentConfig(), seed=99), image, LANDMARKS, seed=(7, 0, 3))
    other = augment(aug, image, LANDMARKS, seed=(7, 0, 4))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])


def test_build_seed_repeats_the_stream():
    image = draw_dots(HW, LANDMARKS)
    a, b = build_augmentation(AugmentConfig(), seed=3), build_augmentation(AugmentConfig(), seed=3)
    for _ in range(3):
        np.testing.assert_array_equal(augment(a, image, LANDMARKS)[1], augment(b, image, LANDMARKS)[1])


def test_the_two_flips_draw_independently():
    cfg = AugmentConfig(**{**AugmentConfig.off().to_dict(), "hflip_p": 0.5, "vflip_p": 0.5})
    aug = build_augmentation(cfg)
    outcomes = set()
    for seed in range(40):
        _, (point,) = augment(aug, np.zeros(HW, np.uint8), np.array([[10.0, 20.0]]), seed=seed)
        outcomes.add((point[0] != 10.0, point[1] != 20.0))
    assert outcomes == {(False, False), (False, True), (True, False), (True, True)}


def test_off_is_the_identity():
    assert augmentation_steps(AugmentConfig.off()) == []
    image = draw_dots(HW, LANDMARKS)
    out_image, out_points = augment(build_augmentation(AugmentConfig.off()), image, LANDMARKS, seed=0)
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_allclose(out_points, LANDMARKS, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scale_min=1.2, scale_max=1.1), "scale_min must be <= scale_max but got 1.2 > 1.1."),
        (dict(scale_min=0.0), "scale_min must be positive but got 0.0."),
        (dict(rotate_deg=200), "rotate_deg must be in [0, 180] but got 200."),
        (dict(rotate_deg=-1.0), "rotate_deg must be in [0, 180] but got -1.0."),
        (dict(translate_frac=0.7), "translate_frac must be in [0, 0.5] but got 0.7."),
        (dict(hflip_p=1.5), "hflip_p must be in [0, 1] but got 1.5."),
        (dict(noise_std=-0.1), "noise_std must be in [0, 1] but got -0.1."),
        (dict(gamma_min=1.3), "gamma_min must be <= gamma_max but got 1.3 > 1.2."),
        (dict(gamma_min=0), "gamma_min must be positive but got 0."),
        (dict(blur_sigma=-2.0), "blur_sigma cannot be negative but got -2.0."),
        (dict(brightness="0.2"), "brightness must be a number but got '0.2'."),
        (dict(contrast=float("nan")), "contrast must be finite but got nan."),
    ],
)
def test_augment_config_validation(kwargs, message):
    with pytest.raises(ValueError) as info:
        AugmentConfig(**kwargs)
    assert str(info.value) == message


def test_augment_config_round_trips_through_a_dict():
    cfg = AugmentConfig(rotate_deg=10.0, vflip_p=0.25)
    assert AugmentConfig(**cfg.to_dict()) == cfg


# -------------------------------------------------------------------------------------------------
# dynamic orientation
# -------------------------------------------------------------------------------------------------


def training_labels(n: int = 30, seed: int = 0) -> np.ndarray:
    """Heads with a roughly vertical BPD and horizontal OFD, endpoint order shuffled."""
    rng = np.random.default_rng(seed)
    centre = rng.uniform(150, 250, (n, 2))
    angle = np.radians(rng.uniform(-20, 20, n))
    u = np.stack([np.cos(angle), np.sin(angle)], 1)
    v = np.stack([-np.sin(angle), np.cos(angle)], 1)
    bpd, ofd = rng.uniform(40, 60, (n, 1)), rng.uniform(60, 80, (n, 1))
    pts = np.stack([centre - v * bpd, centre + v * bpd, centre - u * ofd, centre + u * ofd], 1)
    for i in np.flatnonzero(rng.random(n) < 0.5):
        pts[i, [0, 1]] = pts[i, [1, 0]]
    for i in np.flatnonzero(rng.random(n) < 0.5):
        pts[i, [2, 3]] = pts[i, [3, 2]]
    return pts


def test_fit_finds_each_pairs_direction_whatever_the_endpoint_order():
    orientation = Orientation.fit(training_labels())
    np.testing.assert_allclose(orientation.ofd_direction, [1, 0], atol=0.05)
    np.testing.assert_allclose(orientation.bpd_direction, [0, 1], atol=0.05)


def test_apply_orders_each_pair_by_projection():
    labels = training_labels()
    orientation = Orientation.fit(labels)
    ordered = orientation.apply(labels)
    for pair, direction in (((0, 1), orientation.bpd_direction), ((2, 3), orientation.ofd_direction)):
        proj = ordered[:, pair, :] @ np.asarray(direction)
        assert np.all(proj[:, 0] <= proj[:, 1])
    np.testing.assert_array_equal(orientation.apply(ordered), ordered)
    assert np.array_equal(np.sort(ordered.reshape(-1)), np.sort(labels.reshape(-1)))


@pytest.mark.parametrize("rotate", [0.0, 25.0, -25.0])
def test_order_is_fixed_after_hflip_and_rotation(rotate):
    labels = training_labels()
    orientation = Orientation.fit(labels)
    reference = orientation.apply(labels[:8])
    cfg = AugmentConfig(**{**AugmentConfig.off().to_dict(), "hflip_p": 1.0,
                           "rotate_deg": abs(rotate), "affine_p": 1.0 if rotate else 0.0})
    aug = build_augmentation(cfg)
    for seed, (before, after_ref) in enumerate(zip(labels[:8], reference)):
        _, moved = augment(aug, np.zeros(HW, np.uint8), after_ref, seed=seed)
        # the flip reverses the OFD's raw order along x; orientation puts it back
        assert moved[3, 0] < moved[2, 0]
        fixed = orientation.apply(moved)
        assert fixed[2, 0] < fixed[3, 0]
        assert fixed[0, 1] < fixed[1, 1]
        assert np.array_equal(np.sort(fixed.reshape(-1)), np.sort(moved.reshape(-1)))


def test_apply_works_on_any_leading_shape():
    orientation = Orientation.fit(training_labels())
    pts = training_labels(6).reshape(2, 3, 4, 2)
    np.testing.assert_array_equal(orientation.apply(pts).reshape(6, 4, 2), orientation.apply(pts.reshape(6, 4, 2)))
    assert orientation.apply(pts[0, 0]).shape == (4, 2)


def test_orientation_serialises_through_yaml():
    orientation = Orientation.fit(training_labels())
    data = yaml.safe_load(yaml.safe_dump(orientation.to_dict()))
    assert Orientation.from_dict(data) == orientation


@pytest.mark.parametrize(
    "data, message",
    [
        ({"bpd_direction": [0, 1]}, "orientation: missing key 'ofd_direction'."),
        ({"bpd_direction": [0, 0], "ofd_direction": [1, 0]},
         "orientation: bpd_direction must be a non-zero [x, y] pair but got [0, 0]."),
        ([1, 2], "orientation must be a mapping but got [1, 2]."),
    ],
)
def test_orientation_from_dict_errors(data, message):
    with pytest.raises(BiometryInputError) as info:
        Orientation.from_dict(data)
    assert str(info.value) == message


def test_augment_config_accepts_numpy_numbers():
    cfg = AugmentConfig(rotate_deg=np.float64(12.5), noise_std=np.float32(0.01), hflip_p=np.int64(1))
    assert cfg.rotate_deg == 12.5


# -------------------------------------------------------------------------------------------------
# zoom-out mixture and the second look's rendering
# -------------------------------------------------------------------------------------------------

ZOOM_MIX = AugmentConfig(rotate_deg=0.0, scale_min=0.95, scale_max=1.05, translate_frac=0.0,
                         affine_p=1.0, zoom_out_min=0.5, zoom_out_p=0.3, hflip_p=0.0,
                         brightness=0.0, contrast=0.0, gamma_min=1.0, gamma_max=1.0,
                         noise_std=0.0)


def test_zoom_out_mixture_draws_its_share_below_scale_min():
    aug = build_augmentation(ZOOM_MIX)
    points = np.array([[100.0, 136.0], [300.0, 136.0]])
    zooms = []
    for seed in range(400):
        _, out = augment(aug, np.zeros(HW, np.uint8), points, seed=seed)
        zooms.append(np.linalg.norm(out[1] - out[0]) / 200.0)
    zooms = np.array(zooms)
    assert 0.5 - 1e-3 <= zooms.min() and zooms.max() <= 1.05 + 1e-3
    assert 0.24 < np.mean(zooms < 0.95 - 1e-3) < 0.36  # zoom_out_p = 0.3 of 400 draws


def test_zoom_out_mixture_is_left_out_when_it_cannot_zoom_out():
    plain = AugmentConfig(scale_min=0.9, zoom_out_min=0.9, zoom_out_p=0.5)
    assert type(augmentation_steps(plain)[0]).__name__ == "Affine"
    assert type(augmentation_steps(ZOOM_MIX)[0]).__name__ == "OneOf"


@pytest.mark.parametrize("kwargs, message", [
    (dict(zoom_out_min=0.0), "zoom_out_min must be positive but got 0.0."),
    (dict(zoom_out_p=1.5), "zoom_out_p must be in [0, 1] but got 1.5."),
])
def test_zoom_out_options_are_checked(kwargs, message):
    with pytest.raises(ValueError) as info:
        AugmentConfig(**kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize("scale", [0.3, 0.8, 1.6])
def test_zoom_to_centres_the_point_and_keeps_dots_under_their_landmarks(scale):
    source = draw_dots((540, 800), LANDMARKS * 1.5, sigma=3.0)
    centre = (LANDMARKS * 1.5).mean(axis=0)
    image, box = zoom_to(source, centre, scale, HW)
    assert image.shape == HW and image.dtype == np.uint8
    middle = box.to_input(centre[None])[0]
    assert np.abs(middle - [199.5, 135.5]).max() <= 0.5 + 1e-9
    points = box.to_input(LANDMARKS * 1.5)
    np.testing.assert_allclose(box.to_original(points), LANDMARKS * 1.5)
    if scale >= 0.8:  # dots of 3 px shrunk to under a pixel cannot be located
        assert np.abs(dot_centres(image, points) - points).max() < TOLERANCE_PX


def test_zoom_to_far_outside_the_image_gives_an_empty_frame():
    image, _ = zoom_to(np.full((540, 800), 200, np.uint8), np.array([5000.0, 5000.0]), 0.5, (64, 96))
    assert image.max() == 0
