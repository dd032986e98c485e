"""Real data as it comes: a landmark outside the image (a head cut by the frame) reaches training;
an image listed twice is kept once when the rows agree and refused when they do not.

The choice: such a landmark is not masked. Its target is the Gaussian at its true position, so
only the tail of it lies on the map, highest at the border; the soft-argmax cannot leave the map,
so the model learns a point near the border: its error is the landmark's distance outside (at
most ``biometry.checks.OUTSIDE_MARGIN_FRAC`` of the image) plus up to one decoding window.
"""
import argparse
import csv
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from biometry.codec import HeatmapCodec
from biometry.commands import inspect as inspect_command
from biometry.errors import BiometryInputError
from biometry.io import load_records
from biometry.losses import LossConfig, biometry_loss
from biometry.models import create_model
from biometry.transforms import AugmentConfig, Orientation
from trainables.data import HeatmapDataset, prepare_images

INPUT_HW = (64, 96)


def images_with_one_landmark_outside(synthetic_csv):
    """Four synthetic records; the first one's bpd1 moved 29.5 px left of a 400 px wide image."""
    records = load_records(synthetic_csv)[:4]
    landmarks = records[0].landmarks.copy()
    landmarks[0, 0] = -30.0
    records[0] = dataclasses.replace(records[0], landmarks=landmarks)
    return prepare_images(records, INPUT_HW, threads=1)


def test_a_landmark_outside_the_input_is_a_border_target_and_trains_one_step(synthetic_csv):
    images = images_with_one_landmark_outside(synthetic_csv)
    codec = HeatmapCodec(input_hw=INPUT_HW, stride=2, sigma=2.0)
    dataset = HeatmapDataset(images, codec=codec, orientation=Orientation.fit(images.landmarks))
    image, heatmaps, keypoints = dataset[0]
    k = int(torch.argmin(keypoints[:, 0]))
    outside_px = -0.5 - float(keypoints[k, 0])
    assert outside_px > 6  # about 29.5 * 96 / 400 input pixels left of the input
    assert codec.keypoint_weights(keypoints.numpy())[k] == 0  # the codec calls it off the input
    peak = np.unravel_index(int(heatmaps[k].argmax()), heatmaps[k].shape)
    assert peak[1] == 0 and 0 < float(heatmaps[k].max()) < 0.5  # the tail only, on the border
    decoded, _ = codec.decode(heatmaps[None] * 20, beta=1.0, decode="window")
    assert -0.5 <= float(decoded[0, k, 0]) < codec.window_radius * codec.stride  # near the border

    model = create_model("unet", width=8, depth=3, output_stride=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = [torch.stack(items) for items in zip(*(dataset[i] for i in range(len(dataset))))]
    pred = model(batch[0])
    coords, _ = codec.decode(pred, beta=20.0)
    loss, terms = biometry_loss(pred, batch[1], coords, batch[2],
                                LossConfig(heatmap_weight=1.0, coord_weight=1.0),
                                coord_scale=float(INPUT_HW[1]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in terms.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_augmentation_keeps_a_landmark_outside_the_input(synthetic_csv):
    """albumentations with ``remove_invisible=False``: the four keypoints survive every draw,
    wherever the rotation, scaling and shift put them."""
    images = images_with_one_landmark_outside(synthetic_csv)
    codec = HeatmapCodec(input_hw=INPUT_HW, stride=2, sigma=2.0)
    dataset = HeatmapDataset(images, codec=codec, orientation=Orientation.fit(images.landmarks),
                             augment=AugmentConfig(rotate_deg=30.0, affine_p=1.0))
    torch.manual_seed(0)
    outside = 0
    for _ in range(20):
        _, heatmaps, keypoints = dataset[0]
        assert keypoints.shape == (4, 2) and torch.isfinite(keypoints).all()
        assert torch.isfinite(heatmaps).all()
        outside += int(codec.keypoint_weights(keypoints.numpy()).min() == 0)
    assert outside > 0


def repeat_row(path, row: int, **changes) -> None:
    """Append a copy of data row ``row`` (1-based) to the CSV at ``path``, with ``changes``."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    rows.append({**rows[row - 1], **changes})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def csv_copy(synthetic_csv, tmp_path):
    shutil.copytree(synthetic_csv.parent, tmp_path / "data")
    return tmp_path / "data" / synthetic_csv.name


def test_an_image_listed_twice_with_other_landmarks_is_refused_naming_both_rows(csv_copy):
    n = len(load_records(csv_copy))
    repeat_row(csv_copy, 2, ofd_x1="80.5")
    with pytest.raises(BiometryInputError) as err:
        load_records(csv_copy)
    assert str(err.value) == (f"{csv_copy}: row 2 (000_2HC.png) and row {n + 1} (000_2HC.png) name "
                              "the same image with different landmarks, pixel size or HC")


def test_an_exact_repeat_is_kept_once_and_reported(csv_copy, tmp_path, capsys):
    n = len(load_records(csv_copy))
    repeat_row(csv_copy, 3)
    out = tmp_path / "out"
    assert inspect_command.run(argparse.Namespace(data=str(csv_copy), out=str(out), skip_bad=False,
                                                  overlays=0)) == 0
    report = json.loads((out / "inspect.json").read_text())
    assert report["n_images"] == n
    assert report["repeated_rows"] == [{"kept": "row 3 (001_HC.png)",
                                        "dropped": f"row {n + 1} (001_HC.png)"}]
    assert (f"warning: {csv_copy}: 1 rows repeat an earlier row exactly and were dropped: "
            f"row {n + 1} (001_HC.png) (= row 3 (001_HC.png))") in capsys.readouterr().err
