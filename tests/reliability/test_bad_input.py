"""Bad input through every command, as a user sees it (a process of its own).

The contract (shared/docs/interfaces.md): exit non-zero, ONE line on stderr naming the file, row
or key at fault, no traceback (unless --debug), and nothing already written is deleted or changed
(every case runs in a folder holding ``out/keep.txt``; the commands that take ``--out`` write
there). No case trains: each error must come before any heavy work.

The table is run once, up to three commands at a time; each case is still its own test. A plain
``python`` costs seconds of torch/ray imports on a small machine, so each command runs in a
process forked from an interpreter that imported those libraries once, as ``python ARGV`` would
run it (reliability_helpers.PreloadedPython); test_debug_adds_the_traceback and the other
reliability tests start plain interpreters.
"""
from __future__ import annotations

import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reliability_helpers import (  # noqa: E402
    REPO,
    PreloadedPython,
    copy_dataset,
    edit_csv_cell,
    one_error_line,
    run_command,
    tree_digest,
)

BIOMETRY = ["-m", "biometry"]
TRAIN = ["-m", "trainables.train"]
SEARCH = ["search/run.py"]
COMPARE = ["search/compare.py"]
SMOKE_TRIAL = str(REPO / "configs/trial/smoke.yaml")
BAD_ROW_IMAGE = "001_HC.png"  # row 3 of the synthetic data set


@dataclass
class Fixtures:
    dataset_csv: Path
    model_folder: Path


# -- bad data sets (each returns the DATA argument) -------------------------------------------
def data_missing(d: Path, fx: Fixtures) -> Path:
    return d / "no-such-data.csv"


def data_corrupt_png(d: Path, fx: Fixtures) -> Path:
    csv = copy_dataset(fx.dataset_csv, d / "data")
    png = csv.parent / BAD_ROW_IMAGE
    png.write_bytes(png.read_bytes()[:200])  # a truncated PNG among good ones
    return csv


def data_missing_column(d: Path, fx: Fixtures) -> Path:
    csv = copy_dataset(fx.dataset_csv, d / "data")
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(",".join(line.split(",")[:9] + line.split(",")[10:])
                             for line in lines) + "\n")  # drop ofd_y2
    return csv


def data_renamed_column(d: Path, fx: Fixtures) -> Path:
    csv = copy_dataset(fx.dataset_csv, d / "data")
    csv.write_text(csv.read_text().replace("bpd_x1", "bpd_xl", 1))
    return csv


def data_nan(d: Path, fx: Fixtures) -> Path:
    csv = copy_dataset(fx.dataset_csv, d / "data")
    edit_csv_cell(csv, 3, "bpd_y1", "nan")
    return csv


def data_outside(d: Path, fx: Fixtures) -> Path:
    csv = copy_dataset(fx.dataset_csv, d / "data")
    edit_csv_cell(csv, 3, "ofd_x2", "460")  # the images are 400 px wide: 40 px of margin
    return csv


def data_negative_spacing(d: Path, fx: Fixtures) -> Path:
    csv = copy_dataset(fx.dataset_csv, d / "data")
    edit_csv_cell(csv, 3, "pixel_mm", "-0.3")
    return csv


def data_text_in_number(d: Path, fx: Fixtures) -> Path:
    csv = copy_dataset(fx.dataset_csv, d / "data")
    edit_csv_cell(csv, 3, "pixel_mm", "0,3mm")
    return csv


def data_dotdot(d: Path, fx: Fixtures) -> Path:
    csv = copy_dataset(fx.dataset_csv, d / "data")
    shutil.copy(csv.parent / BAD_ROW_IMAGE, d / "outside.png")
    edit_csv_cell(csv, 3, "image", "../outside.png")
    return csv


def data_absolute(d: Path, fx: Fixtures) -> Path:
    csv = copy_dataset(fx.dataset_csv, d / "data")
    shutil.copy(csv.parent / BAD_ROW_IMAGE, d / "outside.png")
    edit_csv_cell(csv, 3, "image", str(d / "outside.png"))
    return csv


def data_missing_image(d: Path, fx: Fixtures) -> Path:
    csv = copy_dataset(fx.dataset_csv, d / "data")
    (csv.parent / BAD_ROW_IMAGE).unlink()
    return csv


def data_not_csv(d: Path, fx: Fixtures) -> Path:
    path = d / "data.csv"
    path.write_bytes(bytes(range(256)) * 4)
    return path


def data_header_only(d: Path, fx: Fixtures) -> Path:
    csv = copy_dataset(fx.dataset_csv, d / "data")
    csv.write_text(csv.read_text().splitlines()[0] + "\n")
    return csv


def data_empty_folder(d: Path, fx: Fixtures) -> Path:
    (d / "data").mkdir()
    return d / "data"


def data_hc18_missing_mask(d: Path, fx: Fixtures) -> Path:
    """A 3-image HC18 folder (real images) whose second image has no mask or outline."""
    src = REPO.parent / "shared" / "data" / "hc18"
    folder = d / "hc18"
    (folder / "training_set").mkdir(parents=True)
    lines = (src / "training_set_pixel_size_and_HC.csv").read_text().splitlines()[:4]
    (folder / "training_set_pixel_size_and_HC.csv").write_text("\n".join(lines) + "\n")
    for line in lines[1:]:
        name = line.split(",")[0]
        shutil.copy(src / "training_set" / name, folder / "training_set" / name)
        if name != "001_HC.png":
            mask = name.replace(".png", "_Mask.png")
            shutil.copy(src / "training_set" / mask, folder / "training_set" / mask)
    return folder


def data_hc18_bad_spacing(d: Path, fx: Fixtures) -> Path:
    folder = data_hc18_missing_mask(d, fx)
    csv = folder / "training_set_pixel_size_and_HC.csv"
    csv.write_text(csv.read_text().replace("0.0896585200514", "zero", 1))
    return folder


DATA = {  # name: (builder, substrings the error line must hold)
    "missing": (data_missing, ["no-such-data.csv", "no such file"]),
    "corrupt_png": (data_corrupt_png, [BAD_ROW_IMAGE, "row 3", "cannot decode"]),
    "missing_column": (data_missing_column, ["landmarks.csv", "missing column 'ofd_y2'"]),
    "renamed_column": (data_renamed_column, ["landmarks.csv", "missing column 'bpd_x1'"]),
    "nan_coordinate": (data_nan, ["landmarks.csv", "row 3", "'bpd_y1'", "nan"]),
    "outside_image": (data_outside, ["row 3", "'ofd_x2'", "outside the 400x270 image"]),
    "negative_spacing": (data_negative_spacing, ["row 3", "'pixel_mm' must be > 0"]),
    "text_in_number": (data_text_in_number, ["row 3", "'pixel_mm' is not a number"]),
    "dotdot_image": (data_dotdot, ["row 3", "leaves the data folder"]),
    "absolute_image": (data_absolute, ["row 3", "leaves the data folder"]),
    "missing_image": (data_missing_image, ["row 3", BAD_ROW_IMAGE, "not found"]),
    "not_csv": (data_not_csv, ["data.csv", "not a readable CSV"]),
    "header_only": (data_header_only, ["landmarks.csv", "no data rows"]),
    "empty_folder": (data_empty_folder, ["data", "neither an HC18 folder"]),
    "hc18_missing_mask": (data_hc18_missing_mask, ["001_HC"]),
    "hc18_bad_spacing": (data_hc18_bad_spacing, ["row 2", "pixel size(mm)", "zero"]),
}


# -- other inputs ----------------------------------------------------------------------------
def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def trial_yaml(d: Path, text: str) -> Path:
    """A trial config: the smoke config plus ``text`` (YAML merged at the top level)."""
    raw = yaml.safe_load((REPO / "configs/trial/smoke.yaml").read_text())
    for section, values in (yaml.safe_load(text) or {}).items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section].update(values)
        else:
            raw[section] = values
    return write(d / "trial.yaml", yaml.safe_dump(raw))


def preset_yaml(d: Path, search: dict | None = None, trial: dict | None = None,
                extra: str = "") -> Path:
    raw = yaml.safe_load((REPO / "configs/presets/smoke.yaml").read_text())
    raw["search"].update(search or {})
    for section, values in (trial or {}).items():
        raw["trial"].setdefault(section, {}).update(values)
    return write(d / "preset.yaml", yaml.safe_dump(raw) + extra)


def model_copy(d: Path, fx: Fixtures, **spec_changes) -> Path:
    folder = d / "model"
    shutil.copytree(fx.model_folder, folder)
    if spec_changes:
        spec = yaml.safe_load((folder / "model.yaml").read_text())
        spec.update(spec_changes)
        (folder / "model.yaml").write_text(yaml.safe_dump(spec))
    return folder


def images_dir(d: Path, fx: Fixtures, *, corrupt: bool = False) -> Path:
    folder = d / "images"
    folder.mkdir()
    for name in ("000_HC.png", "000_2HC.png", "001_HC.png"):
        shutil.copy(fx.dataset_csv.parent / name, folder / name)
    if corrupt:
        (folder / "001_HC.png").write_bytes((folder / "001_HC.png").read_bytes()[:120])
    return folder


# -- the table -------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    argv: Callable[[Path, Fixtures], list]  # (case folder, fixtures) -> argv after `python`
    expect: list[str]
    env: dict | None = None


CASES: list[Case] = []


def case(id: str, expect, argv, env=None) -> None:
    CASES.append(Case(id, argv, [expect] if isinstance(expect, str) else list(expect), env))


def out(d: Path) -> str:
    return str(d / "out")


# inspect: every bad data set (the other commands share the importer: a few each, to check that
# their error reaches the user as one line)
for name, (build, expect) in DATA.items():
    case(f"inspect-{name}", expect,
         lambda d, fx, build=build: [*BIOMETRY, "inspect", build(d, fx), "--out", out(d)])
case("inspect-out-is-a-file", "keep.txt",
     lambda d, fx: [*BIOMETRY, "inspect", fx.dataset_csv, "--out", d / "out" / "keep.txt"])

# eda
for name in ("missing", "corrupt_png", "nan_coordinate"):
    build, expect = DATA[name]
    case(f"eda-{name}", expect,
         lambda d, fx, build=build: [*BIOMETRY, "eda", build(d, fx), "--out", out(d)])

# evaluate
for name in ("corrupt_png", "absolute_image"):
    build, expect = DATA[name]
    case(f"evaluate-data-{name}", expect,
         lambda d, fx, build=build: [*BIOMETRY, "evaluate", "--model", fx.model_folder,
                                     "--data", build(d, fx), "--out", out(d)])
case("evaluate-model-missing", ["no-model", "not found"],
     lambda d, fx: [*BIOMETRY, "evaluate", "--model", d / "no-model", "--data", fx.dataset_csv,
                    "--out", out(d)])
case("evaluate-model-yaml-missing", ["model.yaml", "not found"],
     lambda d, fx: [*BIOMETRY, "evaluate", "--model", _without(model_copy(d, fx), "model.yaml"),
                    "--data", fx.dataset_csv, "--out", out(d)])
case("evaluate-model-weights-missing", ["model.pt", "not found"],
     lambda d, fx: [*BIOMETRY, "evaluate", "--model", _without(model_copy(d, fx), "model.pt"),
                    "--data", fx.dataset_csv, "--out", out(d)])
case("evaluate-model-unknown-architecture", ["model.yaml", "resnet50"],
     lambda d, fx: [*BIOMETRY, "evaluate", "--model", model_copy(d, fx, architecture="resnet50"),
                    "--data", fx.dataset_csv, "--out", out(d)])
case("evaluate-model-bad-kwargs", ["model.yaml", "colour"],
     lambda d, fx: [*BIOMETRY, "evaluate", "--model",
                    model_copy(d, fx, model_kwargs={"width": 8, "colour": "red"}),
                    "--data", fx.dataset_csv, "--out", out(d)])
case("evaluate-model-unknown-key", ["model.yaml", "unknown key 'learning_rate'"],
     lambda d, fx: [*BIOMETRY, "evaluate", "--model", model_copy(d, fx, learning_rate=0.1),
                    "--data", fx.dataset_csv, "--out", out(d)])
case("evaluate-model-bad-step-option", ["model.yaml", "second_look", "'low' <= 'target' <= 'high'"],
     lambda d, fx: [*BIOMETRY, "evaluate", "--model", model_copy(d, fx, postprocess=[
         {"step": "second_look", "quantile": None, "low": 50, "high": 40, "target": 45}]),
                    "--data", fx.dataset_csv, "--out", out(d)])
case("evaluate-model-mask-step-without-mask", ["model.yaml", "step 'mask_fallback' needs the "
                                               "model's mask channel"],
     lambda d, fx: [*BIOMETRY, "evaluate", "--model", model_copy(d, fx, postprocess=[
         {"step": "mask_fallback", "threshold": 0.05}]),
                    "--data", fx.dataset_csv, "--out", out(d)])
case("evaluate-bad-set", ["--set", "unknown step 'nope'"],
     lambda d, fx: [*BIOMETRY, "evaluate", "--model", fx.model_folder, "--set", "nope.x=1",
                    "--data", fx.dataset_csv, "--out", out(d)])
case("evaluate-postprocess-file-missing", ["steps.yaml", "not found"],
     lambda d, fx: [*BIOMETRY, "evaluate", "--model", fx.model_folder, "--postprocess",
                    d / "steps.yaml", "--data", fx.dataset_csv, "--out", out(d)])
case("evaluate-model-wrong-shape", ["model.pt", "do not match"],
     lambda d, fx: [*BIOMETRY, "evaluate", "--model",
                    model_copy(d, fx, model_kwargs={"width": 16, "depth": 3, "output_stride": 2}),
                    "--data", fx.dataset_csv, "--out", out(d)])
case("evaluate-model-corrupt-weights", ["model.pt", "cannot load"],
     lambda d, fx: [*BIOMETRY, "evaluate", "--model", _garbage(model_copy(d, fx), "model.pt"),
                    "--data", fx.dataset_csv, "--out", out(d)])

# predict
case("predict-images-missing", ["no-images", "not found"],
     lambda d, fx: [*BIOMETRY, "predict", "--model", fx.model_folder, "--images", d / "no-images",
                    "--pixel-mm", "0.1", "--out", out(d)])
case("predict-images-none", ["no .png"],
     lambda d, fx: [*BIOMETRY, "predict", "--model", fx.model_folder, "--images",
                    write(d / "empty" / "notes.txt", "x").parent, "--pixel-mm", "0.1",
                    "--out", out(d)])
case("predict-corrupt-png", ["001_HC.png", "cannot decode"],
     lambda d, fx: [*BIOMETRY, "predict", "--model", fx.model_folder, "--images",
                    images_dir(d, fx, corrupt=True), "--pixel-mm", "0.1", "--out", out(d)])
case("predict-pixel-mm-negative", ["--pixel-mm", "-0.1"],
     lambda d, fx: [*BIOMETRY, "predict", "--model", fx.model_folder, "--images",
                    images_dir(d, fx), "--pixel-mm=-0.1", "--out", out(d)])
case("predict-pixel-mm-nan", ["--pixel-mm", "nan"],
     lambda d, fx: [*BIOMETRY, "predict", "--model", fx.model_folder, "--images",
                    images_dir(d, fx), "--pixel-mm", "nan", "--out", out(d)])
case("predict-pixel-mm-not-a-file", ["--pixel-mm", "spacing.csv"],
     lambda d, fx: [*BIOMETRY, "predict", "--model", fx.model_folder, "--images",
                    images_dir(d, fx), "--pixel-mm", d / "spacing.csv", "--out", out(d)])
case("predict-pixel-mm-csv-columns", ["spacing.csv", "image,pixel_mm"],
     lambda d, fx: [*BIOMETRY, "predict", "--model", fx.model_folder, "--images",
                    images_dir(d, fx), "--pixel-mm", write(d / "spacing.csv", "name,mm\na,1\n"),
                    "--out", out(d)])
case("predict-pixel-mm-csv-missing-row", ["spacing.csv", "001_HC.png"],
     lambda d, fx: [*BIOMETRY, "predict", "--model", fx.model_folder, "--images",
                    images_dir(d, fx), "--pixel-mm",
                    write(d / "spacing.csv", "image,pixel_mm\n000_HC.png,0.1\n000_2HC.png,0.1\n"),
                    "--out", out(d)])
case("predict-pixel-mm-csv-nan", ["spacing.csv", "row 2"],
     lambda d, fx: [*BIOMETRY, "predict", "--model", fx.model_folder, "--images",
                    images_dir(d, fx), "--pixel-mm",
                    write(d / "spacing.csv", "image,pixel_mm\n000_HC.png,0.1\n000_2HC.png,nan\n"
                                             "001_HC.png,0.1\n"), "--out", out(d)])
case("predict-model-unknown-architecture", ["model.yaml", "resnet50"],
     lambda d, fx: [*BIOMETRY, "predict", "--model", model_copy(d, fx, architecture="resnet50"),
                    "--images", images_dir(d, fx), "--pixel-mm", "0.1", "--out", out(d)])

# python -m trainables.train
case("train-config-missing", ["nope.yaml", "not found"],
     lambda d, fx: [*TRAIN, "--config", d / "nope.yaml", "--out", out(d)])
case("train-config-invalid-yaml", ["trial.yaml", "invalid YAML"],
     lambda d, fx: [*TRAIN, "--config", write(d / "trial.yaml", "train:\n  epochs: [1,\n"),
                    "--out", out(d)])
case("train-unknown-section", ["trial.yaml", "unknown key 'trainer'"],
     lambda d, fx: [*TRAIN, "--config", trial_yaml(d, "trainer: {epochs: 1}"), "--out", out(d)])
case("train-unknown-key", ["trial.yaml", "unknown key 'train.learning_rate'"],
     lambda d, fx: [*TRAIN, "--config", trial_yaml(d, "train: {learning_rate: 0.1}"),
                    "--out", out(d)])
case("train-wrong-type", ["trial.yaml", "'train.epochs' must be int"],
     lambda d, fx: [*TRAIN, "--config", trial_yaml(d, "train: {epochs: two}"), "--out", out(d)])
case("train-bool-for-int", ["trial.yaml", "'train.batch_size' must be int"],
     lambda d, fx: [*TRAIN, "--config", trial_yaml(d, "train: {batch_size: true}"),
                    "--out", out(d)])
case("train-negative-lr", ["trial.yaml", "'train.lr' must be positive"],
     lambda d, fx: [*TRAIN, "--config", trial_yaml(d, "train: {lr: -0.1}"), "--out", out(d)])
case("train-nan-lr", ["trial.yaml", "'train.lr' must be finite"],
     lambda d, fx: [*TRAIN, "--config", trial_yaml(d, "train: {lr: .nan}"), "--out", out(d)])
case("train-unknown-architecture", ["trial.yaml", "'model.name' must be one of", "resnet50"],
     lambda d, fx: [*TRAIN, "--config", trial_yaml(d, "model: {name: resnet50}"),
                    "--out", out(d)])
case("train-not-a-mapping", ["trial.yaml", "must be a mapping"],
     lambda d, fx: [*TRAIN, "--config", trial_yaml(d, "train: [1, 2]"), "--out", out(d)])
for name in ("corrupt_png", "outside_image"):
    build, expect = DATA[name]
    case(f"train-data-{name}", expect,
         lambda d, fx, build=build: [*TRAIN, "--config", SMOKE_TRIAL, "--data", build(d, fx),
                                     "--out", out(d)])
case("train-resume-without-checkpoint", ["checkpoint", "no checkpoint to resume from"],
     lambda d, fx: [*TRAIN, "--config", SMOKE_TRIAL, "--out", out(d), "--resume"])
case("train-out-under-a-file", ["keep.txt", "Not a directory"],
     lambda d, fx: [*TRAIN, "--config", SMOKE_TRIAL, "--data", fx.dataset_csv, "--out",
                    d / "out" / "keep.txt" / "run"])
case("train-fault-hook-typo", ["BIOMETRY_FAULT", "raise_at_epok"],
     lambda d, fx: [*TRAIN, "--config", SMOKE_TRIAL, "--data", fx.dataset_csv, "--out", out(d)],
     env={"BIOMETRY_FAULT": "raise_at_epok=2"})

# python search/run.py (every case names --out, so nothing lands in ./runs)
case("search-unknown-preset", ["--preset", "turbo", "no such preset"],
     lambda d, fx: [*SEARCH, "--preset", "turbo", "--out", out(d)])
case("search-preset-unknown-key", ["preset.yaml", "unknown key 'search.num_trials'"],
     lambda d, fx: [*SEARCH, "--preset", preset_yaml(d, {"num_trials": 3}), "--out", out(d)])
case("search-preset-wrong-type", ["preset.yaml", "'search.num_samples' must be int"],
     lambda d, fx: [*SEARCH, "--preset", preset_yaml(d, {"num_samples": "ten"}),
                    "--out", out(d)])
case("search-preset-bad-final-combine", ["preset.yaml", "'search.final_combine' must be one of "
                                                        "('maps', 'median') but got 'mean'"],
     lambda d, fx: [*SEARCH, "--preset", preset_yaml(d, {"final_combine": "mean"}),
                    "--out", out(d)])
case("search-preset-unknown-section", ["preset.yaml", "unknown key 'tune'"],
     lambda d, fx: [*SEARCH, "--preset", preset_yaml(d, extra="tune: {x: 1}\n"),
                    "--out", out(d)])
case("search-preset-trial-unknown-key", ["preset", "unknown key 'train.learning_rate'"],
     lambda d, fx: [*SEARCH, "--preset", preset_yaml(d, trial={"train": {"learning_rate": 1}}),
                    "--out", out(d)])
case("search-preset-unknown-architecture", ["preset", "'model.name' must be one of"],
     lambda d, fx: [*SEARCH, "--preset", preset_yaml(d, trial={"model": {"name": "vit"}}),
                    "--out", out(d)])
case("search-space-missing", ["no-space.yaml", "not found"],
     lambda d, fx: [*SEARCH, "--preset", "smoke", "--space", d / "no-space.yaml",
                    "--out", out(d)])
case("search-space-inverted-range", ["space.yaml", "'params.train.lr' has low 0.01 > high 0.001"],
     lambda d, fx: [*SEARCH, "--preset", "smoke", "--out", out(d), "--space",
                    write(d / "space.yaml", "params:\n  train.lr: {low: 0.01, high: 0.001}\n")])
case("search-space-inverted-int-range", ["space.yaml", "'params.model.width' has low 24 > high 8"],
     lambda d, fx: [*SEARCH, "--preset", "smoke", "--out", out(d), "--space",
                    write(d / "space.yaml", "params:\n  model.width: {low: 24, high: 8}\n")])
case("search-space-unknown-key", ["space.yaml", "'params.train.learning_rate' is not a trial config key"],
     lambda d, fx: [*SEARCH, "--preset", "smoke", "--out", out(d), "--space",
                    write(d / "space.yaml", "params:\n  train.learning_rate: {low: 0.1, high: 1}\n")])
case("search-space-unknown-architecture", ["'model.name' must be one of", "resnet50"],
     lambda d, fx: [*SEARCH, "--preset", "smoke", "--out", out(d), "--space",
                    write(d / "space.yaml", "params:\n  model.name: {choices: [unet, resnet50]}\n")])
case("search-space-log-of-zero", ["space.yaml", "'params.train.lr.low' must be positive for log"],
     lambda d, fx: [*SEARCH, "--preset", "smoke", "--out", out(d), "--space",
                    write(d / "space.yaml", "params:\n  train.lr: {low: 0, high: 0.1, log: true}\n")])
case("search-space-wrong-type", ["space.yaml", "'params.train.lr.high' must be a number"],
     lambda d, fx: [*SEARCH, "--preset", "smoke", "--out", out(d), "--space",
                    write(d / "space.yaml", "params:\n  train.lr: {low: 0.001, high: big}\n")])
for name in ("missing", "corrupt_png"):
    build, expect = DATA[name]
    case(f"search-data-{name}", expect,
         lambda d, fx, build=build: [*SEARCH, "--preset", "smoke", "--data", build(d, fx),
                                     "--out", out(d)])
case("search-num-samples-zero", ["num_samples", "must be >= 1"],
     lambda d, fx: [*SEARCH, "--preset", "smoke", "--num-samples", "0", "--out", out(d)])
case("search-max-failures-negative", ["max_failures", "cannot be negative"],
     lambda d, fx: [*SEARCH, "--preset", "smoke", "--max-failures", "-1", "--out", out(d)])
case("search-gpus-on-cpu-cluster", ["--gpus-per-trial 1", "has none"],
     lambda d, fx: [*SEARCH, "--preset", "smoke", "--gpus-per-trial", "1", "--out", out(d)])
case("search-too-many-cpus", ["--cpus-per-trial 64", "more than any node has"],
     lambda d, fx: [*SEARCH, "--preset", "smoke", "--cpus-per-trial", "64", "--out", out(d)])
case("search-resume-nothing", ["--resume", "no search to resume"],
     lambda d, fx: [*SEARCH, "--resume", "--out", out(d)])
case("search-resume-unknown-name", ["--resume", "search.json missing"],
     lambda d, fx: [*SEARCH, "--resume", "--name", "nope", "--out", out(d)])
case("search-name-with-slash", ["--name", "a plain folder name"],
     lambda d, fx: [*SEARCH, "--preset", "smoke", "--name", "../escape", "--out", out(d)])
case("search-out-under-a-file", ["--out", "keep.txt", "is a file"],
     lambda d, fx: [*SEARCH, "--preset", "smoke", "--out", d / "out" / "keep.txt" / "runs"])
# an unreachable --mlflow-uri: tests/reliability/test_faults.py

# python search/compare.py
case("compare-missing", ["no-such-run"],
     lambda d, fx: [*COMPARE, d / "no-such-run", "--out", out(d)])
case("compare-not-a-run-folder", ["not a run folder"],
     lambda d, fx: [*COMPARE, out(d), "--out", d / "cmp"])
case("compare-corrupt-search-json", ["search.json"],
     lambda d, fx: [*COMPARE, write(d / "run" / "search.json", "{not json").parent,
                    "--out", out(d)])
case("compare-top-zero", ["--top", ">= 1"],
     lambda d, fx: [*COMPARE, out(d), "--top", "0", "--out", d / "cmp"])


def _without(folder: Path, name: str) -> Path:
    (folder / name).unlink()
    return folder


def _garbage(folder: Path, name: str) -> Path:
    (folder / name).write_bytes(b"PK\x03\x04 not a torch file" * 10)
    return folder


# -- running the table -------------------------------------------------------------------------
@dataclass
class Outcome:
    proc: object = None
    before: dict | None = None
    after: dict | None = None
    setup_error: BaseException | None = None


def _run_case(c: Case, root: Path, fx: Fixtures, python: PreloadedPython) -> Outcome:
    d = root / c.id
    (d / "out").mkdir(parents=True)
    (d / "out" / "keep.txt").write_text("written before the command ran\n")
    try:
        argv = [str(a) for a in c.argv(d, fx)]
    except Exception as err:  # reported by that case's test alone
        return Outcome(setup_error=err)
    before = tree_digest(d)
    proc = python.run(argv, timeout=300, **(c.env or {}))
    return Outcome(proc, before, tree_digest(d))


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory, dataset_csv, model_folder) -> dict[str, Outcome]:
    """Run the selected cases, three at a time."""
    selected = {item.callspec.params["case_id"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_bad_input"}
    cases = [c for c in CASES if c.id in selected]
    root = tmp_path_factory.mktemp("bad-input")
    fx = Fixtures(dataset_csv=dataset_csv, model_folder=model_folder)
    python = PreloadedPython(tmp_path_factory.mktemp("bad-input-streams"))
    with ThreadPoolExecutor(3) as pool:
        done = pool.map(lambda c: _run_case(c, root, fx, python), cases)
        return dict(zip((c.id for c in cases), done))


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_bad_input(case_id, outcomes):
    c = next(c for c in CASES if c.id == case_id)
    outcome = outcomes[case_id]
    if outcome.setup_error is not None:
        raise outcome.setup_error
    line = one_error_line(outcome.proc)
    for text in c.expect:
        assert text in line, f"{text!r} not in the error line: {line}"
    missing = [p for p in outcome.before if p not in outcome.after]
    changed = [p for p in outcome.before if p in outcome.after and outcome.after[p] != outcome.before[p]]
    assert not missing and not changed, f"deleted {missing}, changed {changed}"


@pytest.mark.parametrize("argv", [
    [*BIOMETRY, "inspect", "/no/such/data.csv", "--out", "/tmp/unused-out"],
    [*TRAIN, "--config", "/no/such/trial.yaml"],
    [*SEARCH, "--preset", "/no/such/preset.yaml", "--out", "/tmp/unused-out"],
    [*COMPARE, "/no/such/run"],
], ids=["biometry", "trainables.train", "search", "compare"])
def test_debug_adds_the_traceback(argv):
    """--debug is the one way to get the traceback; the error line stays the last line."""
    proc = run_command([*argv, "--debug"], timeout=120)
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: "), proc.stderr[-500:]
