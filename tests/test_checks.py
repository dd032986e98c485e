"""biometry.checks: swapped BPD/OFD detection, the central fix in load_records, implausible rows."""
import csv
import dataclasses

import numpy as np
import pytest

from biometry.checks import detect_swapped_semantics, fix_swapped_semantics, implausible_rows, swap_pairs
from biometry.geometry import ellipse_landmarks
from biometry.io import import_dataset, load_records, write_landmark_csv
from biometry.records import LandmarkRecord

HEAD = ellipse_landmarks((200, 150), (160, 120), 20)  # OFD 160, BPD 120


def record(landmarks, name="a.png"):
    return LandmarkRecord(image="a.png", landmarks=np.asarray(landmarks, float), pixel_mm=0.2,
                          subject="1", name=name)


@pytest.fixture(scope="module")
def hc18_records(hc18_dir):
    return load_records(hc18_dir)


def test_detect_swapped_semantics():
    rows = np.stack([HEAD, swap_pairs(HEAD), swap_pairs(HEAD)])
    report = detect_swapped_semantics(rows)
    assert (report.n_rows, report.n_swapped, report.majority_swapped) == (3, 2, True)
    assert report.swapped_mask.tolist() == [False, True, True]
    half = detect_swapped_semantics(rows[:2])
    assert (half.n_swapped, half.majority_swapped) == (1, False)


def test_fix_says_columns_for_a_majority_and_names_the_rows_of_a_minority(capsys):
    records = [record(swap_pairs(HEAD), f"{i}.png") for i in range(4)] + [record(HEAD, "ok.png")]
    fixed, report = fix_swapped_semantics(records, "data.csv")
    assert capsys.readouterr().err == (
        "warning: data.csv: 4 of 5 rows have BPD longer than OFD: the BPD and OFD columns look "
        "swapped; using them swapped\n")
    assert report.n_swapped == 4
    assert all(np.array_equal(r.landmarks, HEAD) for r in fixed)  # the right row stays right

    fixed, report = fix_swapped_semantics(records[3:], "data.csv", rows=["row 4 (3.png)", "row 5 (ok.png)"])
    assert capsys.readouterr().err == (
        "warning: data.csv: BPD longer than OFD in 1 of 2 rows, each fixed by exchanging its BPD "
        "and OFD (BPD is the shorter by definition): row 4 (3.png)\n")
    assert all(np.array_equal(r.landmarks, HEAD) for r in fixed)
    assert report.n_swapped == 1 and report.swapped_rows == ("row 4 (3.png)",)

    kept, report = fix_swapped_semantics(records[4:], "data.csv")
    assert capsys.readouterr().err == "" and kept == records[4:] and report.n_swapped == 0


def swapped_header(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows[0] = [c.replace("bpd_", "tmp_").replace("ofd_", "bpd_").replace("tmp_", "ofd_") for c in rows[0]]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_swapped_copy_of_hc18_is_fixed_with_one_warning(hc18_records, tmp_path, capsys):
    csv_path = write_landmark_csv(hc18_records, tmp_path / "landmarks.csv", link_images=True)
    swapped_header(csv_path)
    result = import_dataset(csv_path)
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("warning")] == [
        f"warning: {csv_path}: 592 of 592 rows have BPD longer than OFD: the BPD and OFD columns "
        "look swapped; using them swapped"]
    assert result.swap.majority_swapped and result.swap.n_swapped == 592
    fixed = np.array([r.landmarks for r in result.records])
    assert fixed == pytest.approx(np.array([r.landmarks for r in hc18_records]), abs=1e-4)
    assert implausible_rows(result.records) == []


def test_a_partly_swapped_csv_has_each_swapped_row_fixed_and_named(tmp_path, capsys, synthetic_csv):
    """10 of 120 rows with BPD and OFD exchanged, the rest right: each of the 10 is fixed, and
    one warning line names the file and the rows."""
    records = load_records(synthetic_csv)
    records = (records * (120 // len(records) + 1))[:120]
    records = [dataclasses.replace(r, name=f"{i:03d}_{r.name}") for i, r in enumerate(records)]
    swapped = list(range(3, 120, 12))[:10]
    given = [dataclasses.replace(r, landmarks=swap_pairs(r.landmarks)) if i in swapped else r
             for i, r in enumerate(records)]
    csv_path = write_landmark_csv(given, tmp_path / "landmarks.csv", link_images=True)
    capsys.readouterr()
    result = import_dataset(csv_path)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    names = [f"row {i + 1} (images/{records[i].name})" for i in swapped]
    assert err == [f"warning: {csv_path}: BPD longer than OFD in 10 of 120 rows, each fixed by "
                   "exchanging its BPD and OFD (BPD is the shorter by definition): "
                   + ", ".join(names)]
    assert result.swap.swapped_rows == tuple(names) and not result.swap.majority_swapped
    fixed = np.array([r.landmarks for r in result.records])
    assert fixed == pytest.approx(np.array([r.landmarks for r in records]), abs=1e-4)
    assert implausible_rows(result.records) == []


def test_real_heads_are_not_flagged(hc18_records):
    assert implausible_rows(hc18_records) == []


def test_implausible_reasons():
    tilted = HEAD.copy()
    centre = HEAD[2:].mean(axis=0)
    rotation = np.array([[np.cos(np.radians(28)), -np.sin(np.radians(28))],
                         [np.sin(np.radians(28)), np.cos(np.radians(28))]])
    tilted[:2] = (HEAD[:2] - centre) @ rotation.T + centre
    shifted = HEAD.copy()
    shifted[:2] += 30 * (HEAD[3] - HEAD[2]) / 160
    narrow = ellipse_landmarks((200, 150), (160, 70), 20)
    flat = HEAD.copy()
    flat[1] = flat[0]
    records = [record(HEAD, "ok.png"), record(tilted, "tilted.png"), record(shifted, "shifted.png"),
               record(narrow, "narrow.png"), record(flat, "flat.png"), record(swap_pairs(HEAD), "swapped.png")]
    assert implausible_rows(records) == [
        ("tilted.png", ["angle 62 deg far from 90"]),
        ("shifted.png", ["centres 30 px apart"]),
        ("narrow.png", ["bpd/ofd ratio 0.44 below 0.55"]),
        ("flat.png", ["bpd has zero length", "centres 60 px apart"]),
        ("swapped.png", ["bpd longer than ofd"]),
    ]
    loose = implausible_rows(records, max_angle_deviation_deg=30, max_centre_offset_frac=0.25, min_ratio=0.4)
    assert [name for name, _ in loose] == ["flat.png", "swapped.png"]
    with pytest.raises(TypeError):
        implausible_rows(records, 30)
    assert implausible_rows([]) == []


def test_a_pixel_size_far_from_the_rest_is_flagged():
    records = [dataclasses.replace(record(HEAD, f"{i}.png"), pixel_mm=0.12 + 0.01 * i) for i in range(5)]
    records.append(dataclasses.replace(record(HEAD, "cm.png"), pixel_mm=1.4))  # mm typed as 10x
    assert implausible_rows(records) == [("cm.png", ["pixel size 1.4 mm, 9.7x the median"])]
    assert implausible_rows(records, max_pixel_mm_factor=20) == []
