"""``python -m biometry inspect``: landmarks.csv, inspect.json, overlays; its output re-imports."""
import argparse
import csv
import json
import shutil

import cv2
import pytest

from biometry.commands import inspect
from biometry.errors import BiometryInputError
from biometry.io import load_records


def inspect_cli(*argv) -> int:
    parser = argparse.ArgumentParser()
    inspect.add_arguments(parser)
    return inspect.run(parser.parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def hc18_inspected(hc18_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "hc18"
    assert inspect_cli(hc18_dir, "--out", out) == 0
    return out


def test_inspect_all_of_hc18(hc18_inspected, hc18_dir):
    report = json.loads((hc18_inspected / "inspect.json").read_text())
    assert report["data"] == str(hc18_dir)
    assert (report["n_images"], report["n_subjects"]) == (592, 485)
    assert report["images_per_subject"] == {"1": 390, "2": 85, "3": 8, "4": 2}
    assert report["subjects"]["017"] == 2
    hc = report["hc_agreement"]
    assert hc["n"] == 592 and hc["mean_abs_diff_mm"] < 0.1 and hc["max_abs_diff_mm"] < 0.2
    assert report["swap"] == {"n_rows": 592, "n_swapped": 0, "majority_swapped": False, "fixed": False,
                              "fixed_rows": []}
    assert report["flagged"] == [] and report["skipped"] == []
    assert report["outside_image"] == {"n": 0, "margin_frac": 0.1, "images": []}
    assert len(report["overlays"]) == 8
    with open(hc18_inspected / "landmarks.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 592 and rows[0]["image"] == "images/000_HC.png"
    assert rows[0]["subject"] == "000" and float(rows[0]["hc_mm"]) == 44.3


def test_overlays_draw_both_diameters(hc18_inspected):
    report = json.loads((hc18_inspected / "inspect.json").read_text())
    overlay = cv2.imread(report["overlays"][0])
    assert overlay.shape == (540, 800, 3)
    colours = {tuple(c) for c in overlay.reshape(-1, 3)[::1]}
    assert inspect.BPD_COLOUR in colours and inspect.OFD_COLOUR in colours


def test_inspect_of_its_own_output_gives_the_same_landmarks(hc18_inspected, tmp_path):
    assert inspect_cli(hc18_inspected / "landmarks.csv", "--out", tmp_path / "again", "--overlays", "0") == 0

    def columns_but_image(path):
        with open(path, newline="") as f:
            return [row[1:] for row in csv.reader(f)]

    assert columns_but_image(tmp_path / "again" / "landmarks.csv") == columns_but_image(hc18_inspected / "landmarks.csv")
    report = json.loads((tmp_path / "again" / "inspect.json").read_text())
    first = json.loads((hc18_inspected / "inspect.json").read_text())
    assert report["hc_agreement"]["mean_abs_diff_mm"] == first["hc_agreement"]["mean_abs_diff_mm"]
    assert report["subjects"] == first["subjects"] and report["overlays"] == []
    assert not (tmp_path / "again" / "overlays").exists()


@pytest.fixture
def data(synthetic_csv, tmp_path):
    shutil.copytree(synthetic_csv.parent, tmp_path / "data")
    return tmp_path / "data" / "landmarks.csv"


def set_cell(path, row: int, column: str, value: str) -> None:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    rows[row - 1][column] = value
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_a_head_cut_by_the_frame_is_kept_and_listed(data, tmp_path, capsys):
    set_cell(data, 1, "bpd_x1", "-3")  # 2.5 px left of the image's edge at -0.5
    out = tmp_path / "out"
    assert inspect_cli(data, "--out", out, "--overlays", "0") == 0
    report = json.loads((out / "inspect.json").read_text())
    assert report["outside_image"] == {"n": 1, "margin_frac": 0.1, "images": [
        {"image": "000_HC.png", "landmarks": ["bpd1"], "max_outside_px": 2.5}]}
    assert ("landmarks outside the image (kept, up to 10% of its size): 1 images: 000_HC.png"
            in capsys.readouterr().out)
    assert load_records(out / "landmarks.csv")[0].landmarks[0, 0] == -3


def test_bad_input_raises_and_writes_nothing(data, tmp_path):
    (data.parent / "001_HC.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    with pytest.raises(BiometryInputError, match=r"row 3 \(001_HC\.png\): .*cannot decode the image"):
        inspect_cli(data, "--out", out)
    assert not out.exists()
    out.mkdir()
    (out / "landmarks.csv").write_text("keep me")
    with pytest.raises(BiometryInputError):
        inspect_cli(data, "--out", out)
    assert (out / "landmarks.csv").read_text() == "keep me"


def test_skip_bad_summary_and_existing_files(data, tmp_path, capsys):
    (data.parent / "001_HC.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert inspect_cli(data, "--out", out, "--skip-bad", "--overlays", "3") == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == f"{data}: 23 images, 12 subjects"
    assert "flagged: 0, skipped: 1" in captured.out
    assert "warning: skipped" in captured.err
    report = json.loads((out / "inspect.json").read_text())
    assert [s["item"] for s in report["skipped"]] == [f"{data} row 3"]
    assert "cannot decode" in report["skipped"][0]["reason"]
    assert len(report["overlays"]) == 3 and (out / "notes.txt").read_text() == "mine"
    assert len(load_records(out / "landmarks.csv")) == 23


def test_swapped_columns_and_flagged_rows(data, tmp_path):
    with open(data, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows[1:]:
        for end in ("x1", "y1", "x2", "y2"):
            row[f"bpd_{end}"], row[f"ofd_{end}"] = row[f"ofd_{end}"], row[f"bpd_{end}"]
    with open(data, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    assert inspect_cli(data, "--out", out, "--overlays", "2") == 0
    report = json.loads((out / "inspect.json").read_text())
    assert report["swap"] == {"n_rows": 24, "n_swapped": 23, "majority_swapped": True, "fixed": True,
                              "fixed_rows": []}
    assert report["flagged"] == []  # the one row that was right is left as it is
    fixed = load_records(out / "landmarks.csv")
    assert [r.name for r in fixed][1:] == [f"images/{row['image']}" for row in rows[1:]]


def test_cli_prints_one_line_and_exits_2_on_bad_input(data, tmp_path, monkeypatch, capsys):
    from biometry import cli

    monkeypatch.setattr(cli, "COMMANDS", {"inspect": cli.COMMANDS["inspect"]})  # only this command
    edit = data.read_text().replace("pixel_mm", "spacing", 1)
    data.write_text(edit)
    assert cli.main(["inspect", str(data), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        f"error: {data}: missing column 'pixel_mm' (the header has: image,spacing,bpd_x1,bpd_y1,bpd_x2,"
        "bpd_y2,ofd_x1,ofd_y1,ofd_x2,ofd_y2,subject,hc_mm)\n")
    assert cli.main(["inspect", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope'}: no such file or folder\n"
    assert not (tmp_path / "out").exists()
