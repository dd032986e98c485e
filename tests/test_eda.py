"""biometry.eda and ``python -m biometry eda``: corrupted real HC18 labels rank on top, the report
and outliers.csv are complete, scores ignore endpoint order, swapped columns are reported."""
import argparse
import csv
import dataclasses
import json
import os

import cv2
import numpy as np
import pytest

from biometry import eda
from biometry.checks import swap_pairs
from biometry.commands import eda as eda_command
from biometry.geometry import ellipse_landmarks
from biometry.io import load_records, write_landmark_csv
from biometry.records import LANDMARK_NAMES, LandmarkRecord

N_ROWS = 100
HEAD = ellipse_landmarks((200, 150), (160, 120), 20)  # OFD 160 px, BPD 120 px


def eda_cli(*argv) -> int:
    parser = argparse.ArgumentParser()
    eda_command.add_arguments(parser)
    return eda_command.run(parser.parse_args([str(a) for a in argv]))


def record(landmarks, name="a.png", pixel_mm=0.2):
    return LandmarkRecord(image="a.png", landmarks=np.asarray(landmarks, float), pixel_mm=pixel_mm,
                          subject=name, name=name)


@pytest.fixture(scope="module")
def hc18_100(hc18_dir, tmp_path_factory):
    """The first 100 real HC18 rows as records (an HC18 folder of hard links, read in ~1 s)."""
    folder = tmp_path_factory.mktemp("hc18_100")
    (folder / "training_set").mkdir()
    lines = (hc18_dir / "training_set_pixel_size_and_HC.csv").read_text().splitlines()
    (folder / "training_set_pixel_size_and_HC.csv").write_text("\n".join(lines[:N_ROWS + 1]) + "\n")
    for line in lines[1:N_ROWS + 1]:
        stem = line.split(",")[0][:-len(".png")]
        for name in (f"{stem}.png", f"{stem}_Mask.png"):
            os.link(hc18_dir / "training_set" / name, folder / "training_set" / name)
    records = load_records(folder)
    assert len(records) == N_ROWS
    return records


def corrupt(landmarks: np.ndarray, kind: str, *, image_hw) -> np.ndarray:
    """One wrong label: an endpoint moved by a fraction of the OFD, the pairs exchanged, or the
    OFD endpoints pulled 25% towards their midpoint."""
    lm = np.array(landmarks, dtype=float)
    ofd = np.linalg.norm(lm[3] - lm[2])
    if kind.startswith("shift"):
        _, which, fraction = kind.split(":")
        k = {"bpd": 0, "ofd": 3}[which]
        # move perpendicular to the diameter, inwards when outwards leaves the image
        other = lm[1 - k] if k < 2 else lm[2]
        direction = np.array([-(lm[k] - other)[1], (lm[k] - other)[0]])
        direction /= np.linalg.norm(direction)
        moved = lm[k] + float(fraction) * ofd * direction
        height, width = image_hw
        if not (0 <= moved[0] <= width - 1 and 0 <= moved[1] <= height - 1):
            moved = lm[k] - float(fraction) * ofd * direction
        lm[k] = moved
    elif kind == "swap":
        lm = swap_pairs(lm)
    elif kind == "shorten":
        centre = lm[2:].mean(axis=0)
        lm[2:] = centre + 0.75 * (lm[2:] - centre)
    else:
        raise ValueError(kind)
    return lm


CORRUPTIONS = {7: "shift:bpd:0.15", 23: "shift:ofd:0.10", 41: "swap", 64: "shorten",
               88: "shift:bpd:0.20"}
SWAPPED_ROWS = (41, 64)  # BPD longer than OFD: the import exchanges their pairs (41 is right again;
# 64, its OFD shortened by a quarter, becomes a round head that scores as an ordinary one)

@pytest.fixture(scope="module")
def corrupted_csv(hc18_100, tmp_path_factory):
    """A landmark CSV of the 100 rows with 5 wrong labels: ``(path, corrupted names)``."""
    path = tmp_path_factory.mktemp("corrupted") / "landmarks.csv"
    write_landmark_csv(hc18_100, path, link_images=True)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = list(rows[0])
    coords = columns[2:10]
    for i, kind in CORRUPTIONS.items():
        lm = np.array([float(rows[i][c]) for c in coords]).reshape(4, 2)
        new = corrupt(lm, kind, image_hw=hc18_100[i].image_size)
        rows[i].update({c: f"{v:.4f}" for c, v in zip(coords, new.ravel())})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path, {rows[i]["image"] for i in CORRUPTIONS}


@pytest.fixture(scope="module")
def corrupted_records(corrupted_csv, hc18_100):
    """The records of ``corrupted_csv`` with its corruptions as given (the import exchanges the
    pairs of the rows whose BPD is longer; here they are put back)."""
    records = load_records(corrupted_csv[0])
    for i, kind in CORRUPTIONS.items():
        lm = corrupt(hc18_100[i].landmarks.copy(), kind, image_hw=hc18_100[i].image_size)
        records[i] = dataclasses.replace(records[i], landmarks=lm)
    return records


def imported_bad(corrupted_csv) -> set[str]:
    """The corrupted names other than the swapped rows the import fixes."""
    path, bad = corrupted_csv
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return bad - {rows[i]["image"] for i in SWAPPED_ROWS}


def test_corrupted_labels_are_among_the_10_highest_scores(corrupted_csv, corrupted_records):
    _, bad = corrupted_csv
    scores = eda.outlier_scores(corrupted_records)
    assert set(scores) == {r.name for r in corrupted_records}
    assert all(isinstance(v, float) and v >= 0 for v in scores.values())
    top10 = sorted(scores, key=scores.get, reverse=True)[:10]
    assert bad <= set(top10), (bad - set(top10), sorted(scores.values())[-10:])
    table = {row.image: row for row in eda.outlier_table(corrupted_records)}
    for i, kind in CORRUPTIONS.items():
        row = table[corrupted_records[i].name]
        assert row.reasons, (kind, row)
        assert row.score > eda.fit_outliers(corrupted_records).cutoff
        if kind in ("swap", "shorten"):
            assert row.reasons[0].startswith("bpd longer than ofd"), row


def test_clean_hc18_rows_have_no_reasons_and_modest_scores(hc18_100):
    table = eda.outlier_table(hc18_100)
    assert [row.reasons for row in table] == [()] * N_ROWS  # HC18 labels are fitted ellipse axes
    assert max(row.score for row in table) < 5


def test_core_subset_drops_the_top_fraction(corrupted_csv, corrupted_records):
    _, bad = corrupted_csv
    kept, excluded = eda.core_subset(corrupted_records, exclude_fraction=0.05)
    assert set(excluded) == bad and len(kept) == N_ROWS - 5
    assert [r.name for r in kept] == [r.name for r in corrupted_records if r.name not in bad]
    scores = eda.outlier_scores(corrupted_records)
    assert [scores[n] for n in excluded] == sorted((scores[n] for n in excluded), reverse=True)
    assert eda.core_subset(corrupted_records, exclude_fraction=0.0) == (corrupted_records, [])
    with pytest.raises(ValueError, match=r"^exclude_fraction must be in \[0, 1\) but got 1\.0\.$"):
        eda.core_subset(corrupted_records, exclude_fraction=1.0)


def test_search_outlier_names_uses_these_scores(corrupted_csv):
    from search.driver import outlier_names
    from trainables.config import DataConfig
    from trainables.data import load_split_records

    path, _ = corrupted_csv
    bad = imported_bad(corrupted_csv)
    cfg = DataConfig(path=str(path))
    train = load_split_records(cfg.path, split_seed=cfg.split_seed)["train"]
    names = outlier_names(cfg, 0.05)
    assert len(names) == round(0.05 * len(train))
    assert names == set(eda.core_subset(train, exclude_fraction=0.05)[1])
    in_train = bad & {r.name for r in train}
    assert in_train
    assert (names <= in_train) if len(in_train) >= len(names) else (in_train <= names)


def test_scores_ignore_endpoint_order_pose_and_row_order(hc18_100):
    rng = np.random.default_rng(0)
    base = eda.outlier_scores(hc18_100)
    angle = np.radians(37)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = []
    for r in hc18_100:
        lm = r.landmarks.copy()
        for pair in ((0, 1), (2, 3)):
            if rng.random() < 0.5:
                lm[list(pair)] = lm[list(pair[::-1])]
        lm = (lm - 300) @ rotation.T * 1.7 + [40, -25]  # rotate, scale (pixel_mm / 1.7), shift
        moved.append(dataclasses.replace(r, landmarks=lm, pixel_mm=r.pixel_mm / 1.7))
    order = rng.permutation(N_ROWS)
    again = eda.outlier_scores([moved[i] for i in order])
    assert again.keys() == base.keys()
    np.testing.assert_allclose([again[k] for k in base], list(base.values()), rtol=1e-6, atol=1e-6)
    _, x0 = eda.landmark_features(hc18_100)
    _, x1 = eda.landmark_features(moved)
    np.testing.assert_allclose(x1, x0, atol=1e-7)


def test_landmark_features_of_known_shapes():
    names, x = eda.landmark_features([record(HEAD), record(swap_pairs(HEAD))])
    assert names == eda.FEATURE_NAMES
    np.testing.assert_allclose(x[0], [0.75, 0, 0, 0, 32.0, 24.0], atol=1e-9)
    assert x[1, 0] == pytest.approx(4 / 3)
    tilted = HEAD.copy()
    centre = tilted[:2].mean(axis=0)
    turn = np.radians(10)
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    tilted[:2] = (tilted[:2] - centre) @ rotation.T + centre + (tilted[3] - tilted[2]) * 0.1
    _, (row,) = eda.landmark_features([record(tilted)])
    assert abs(row[1]) == pytest.approx(10)
    assert row[2] == pytest.approx(0.1) and row[3] == pytest.approx(0, abs=1e-9)
    frame = eda.normalised_landmarks(tilted)[0]
    np.testing.assert_allclose(frame[2:], [[-0.5, 0], [0.5, 0]], atol=1e-12)
    assert frame[0, 1] < 0 < frame[1, 1]


def test_small_and_degenerate_sets():
    rng = np.random.default_rng(1)
    few = [record(HEAD + rng.normal(0, 1, HEAD.shape), f"{i}.png") for i in range(6)]
    zero = HEAD.copy()
    zero[3] = zero[2]
    fit = eda.fit_outliers([*few, record(zero, "zero.png")])
    assert fit.method == "diagonal" and np.isfinite(fit.scores[:6]).all()
    table = eda.outlier_table([*few, record(zero, "zero.png")])
    assert table[0] == ("zero.png", float("inf"), ("ofd has zero length",))
    assert eda.outlier_scores([]) == {}


def test_eda_command_writes_report_csv_and_plots(corrupted_csv, corrupted_records, tmp_path,
                                                 capsys):
    path, _ = corrupted_csv
    bad = imported_bad(corrupted_csv)
    out = tmp_path / "eda"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert eda_cli(path, "--out", out, "--top", 6) == 0
    assert (out / "mine.txt").read_text() == "keep me"
    printed = capsys.readouterr().out
    assert f"{N_ROWS} images" in printed and "top 5" in printed
    assert sum(name in printed for name in bad) == 3

    with open(out / "outliers.csv", newline="") as f:
        lines = f.read().splitlines()
    assert lines[0] == "image,score,reasons"
    with open(out / "outliers.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["image"] for r in rows) == sorted(r.name for r in corrupted_records)
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert {r["image"] for r in rows[:3]} == bad and all(r["reasons"] for r in rows[:3])

    report = (out / "report.md").read_text()
    for name in eda.PLOTS:
        assert f"]({name}.png)" in report
        image = cv2.imread(str(out / f"{name}.png"))
        assert image is not None and image.shape[0] > 100 and image.shape[1] > 100, name
    summary = json.loads((out / "eda.json").read_text())
    assert summary["n_images"] == N_ROWS and len(summary["outliers"]["top"]) == 6
    assert {t["image"] for t in summary["outliers"]["top"][:3]} == bad
    assert summary["outliers"]["n_flagged"] >= 3
    assert summary["swap"]["n_swapped"] == 2 and summary["swap"]["fixed"]
    assert summary["swap"]["fixed_rows"] == [f"row {i + 1} ({corrupted_records[i].name})"
                                             for i in SWAPPED_ROWS]
    assert summary["swap"]["bpd_longer_than_ofd"] == []
    assert "each was fixed on import by exchanging its BPD and OFD" in report


def test_swapped_columns_csv_is_reported(hc18_100, tmp_path, capsys):
    """All rows but one have BPD and OFD exchanged: the import swaps them back, and leaves the one
    row that was right as it is."""
    records = [dataclasses.replace(r, landmarks=swap_pairs(r.landmarks)) for r in hc18_100[:30]]
    records[4] = hc18_100[4]
    path = write_landmark_csv(records, tmp_path / "swapped" / "landmarks.csv", link_images=True)
    with open(path, newline="") as f:
        right = list(csv.DictReader(f))[4]["image"]
    assert eda_cli(path, "--out", tmp_path / "out", "--top", 3) == 0
    out = capsys.readouterr()
    assert "columns look swapped" in out.err and "(columns swapped back)" in out.out
    summary = json.loads((tmp_path / "out" / "eda.json").read_text())
    assert summary["swap"] == {"n_rows": 30, "n_swapped": 29, "majority_swapped": True,
                               "fixed": True, "fixed_rows": [], "bpd_longer_than_ofd": []}
    assert right not in {t["image"] for t in summary["outliers"]["top"]}
    assert "swapped back on import" in (tmp_path / "out" / "report.md").read_text()


def test_bad_top_is_refused():
    parser = argparse.ArgumentParser()
    eda_command.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["data.csv", "--out", "x", "--top", "-1"])


def test_density_order_is_the_trainers_order(hc18_100):
    from biometry.transforms import Orientation

    lm = np.array([r.landmarks for r in hc18_100])
    np.testing.assert_array_equal(eda.order_pairs(lm), Orientation.fit(lm).apply(lm))


def test_heads_cut_by_the_frame_are_listed(hc18_100, tmp_path, capsys):
    """A head moved up until its top landmark is 1.5 px above the image: kept, and named in the
    report and in eda.json."""
    records = list(hc18_100[:20])
    lm = records[3].landmarks
    records[3] = dataclasses.replace(records[3], landmarks=lm - [0, lm[:, 1].min() + 2])
    top = LANDMARK_NAMES[int(np.argmin(records[3].landmarks[:, 1]))]
    path = write_landmark_csv(records, tmp_path / "cut" / "landmarks.csv", link_images=True)
    with open(path, newline="") as f:
        name = list(csv.DictReader(f))[3]["image"]
    assert eda_cli(path, "--out", tmp_path / "out", "--top", 0) == 0
    assert "landmarks outside the image (kept): 1 images" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "eda.json").read_text())
    assert summary["outside_image"] == {"n": 1, "margin_frac": 0.1, "images": [
        {"image": name, "landmarks": [top], "max_outside_px": 1.5}]}
    assert (f"- heads cut by the frame: 1 images with a landmark outside the image, kept (up to "
            f"10% of its size): `{name}` ({top}, 1.5 px).") in (tmp_path / "out" / "report.md").read_text()
