"""One trial, no Ray: config -> data -> model -> train loop -> per-epoch report and checkpoint.

    python -m trainables.train --config configs/trial/smoke.yaml [--data PATH] [--out DIR]

The search calls :func:`run_trial` inside a Ray worker with a reporter that forwards each epoch to
Ray Tune; run alone, each epoch is printed and the latest checkpoint, the best model folder and
``metrics.json`` land in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from biometry import atomic
from biometry.constants import BEST_OBJECTIVE, OBJECTIVE
from biometry.errors import BiometryInputError, run_cli
from biometry.geometry import diameter_lengths
from biometry.inference import LandmarkPredictor, ModelSpec, save_model_folder, set_model_postprocess
from biometry.losses import biometry_loss
from biometry.metrics import summarize
from biometry.models import create_model, split_mask
from biometry.postprocess import create_steps, steps_to_config
from biometry.transforms import Letterbox
from trainables.config import TrialConfig, load_config
from trainables.data import (
    HeatmapDataset, PreparedImages, PreparedSplits, head_size_weights, prepare_splits,
)

TRAINER_STATE = "trainer.pt"

# reporter(metrics, checkpoint_dir): called once per epoch; the folder is only valid during the call
Reporter = Callable[[dict, Path], None]


class TrialHooks:
    """Calls into the epoch loop that change nothing here; tests pass an object with the same
    two methods (``run_trial(hooks=...)``, e.g. ``trainables.faults.InjectedFaults``)."""

    def on_epoch_start(self, epoch: int) -> None:
        """Before epoch ``epoch`` (1-based) trains."""

    def after_report(self, epoch: int) -> None:
        """After epoch ``epoch`` was reported and checkpointed."""


@dataclass
class TrainerState:
    epoch: int = 0  # last finished epoch
    best_value: float = math.inf
    best_epoch: int = 0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BiometryInputError("'train.device' is cuda but no CUDA device is available")
    return torch.device(name)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_loader(dataset, *, batch_size: int, shuffle: bool, num_workers: int, seed: int,
                pin_memory: bool, weights: np.ndarray | None = None) -> DataLoader:
    """``weights``: draw training samples with replacement in proportion to them (one epoch is
    still ``len(dataset)`` samples). The sampler shares the loader's generator, so reseeding
    ``loader.generator`` fixes both the draw and the workers' augmentation seeds."""
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if weights is not None:
        sampler = WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double),
                                        num_samples=len(dataset), replacement=True,
                                        generator=generator)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, drop_last=shuffle, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=pin_memory,
                      generator=generator)


def evaluate_split(predictor: LandmarkPredictor, images: PreparedImages, *,
                   batch_size: int = 32) -> tuple[dict, np.ndarray]:
    """Validation metrics in mm (original pixels and spacing) and per-image uncertainty.

    The original images go through ``predictor.predict`` as in ``evaluate``, so a second look at
    an out-of-range head (``ModelSpec.head_scale``) is part of what validation measures. Without
    them (``sources`` None) the letterboxed images stand in for the originals.
    """
    if images.sources is not None:
        first_looks = [(image, Letterbox(*map(float, box)))
                       for image, box in zip(images.images, images.letterbox)]
        pred_original, uncertainty = predictor.predict(images.sources, batch_size=batch_size,
                                                       letterboxed=first_looks,
                                                       pixel_mm=images.pixel_mm)
    else:  # an input pixel is 1 / scale original pixels
        input_mm = np.asarray(images.pixel_mm) / np.asarray(images.letterbox)[:, 0]
        coords, uncertainty = predictor.predict(list(images.images), batch_size=batch_size,
                                                pixel_mm=input_mm)
        pred_original = images.to_original(coords)
    summary = summarize(pred_original, images.original, images.pixel_mm, uncertainty=uncertainty)
    return summary.as_dict(), uncertainty


def validate_into_spec(predictor: LandmarkPredictor, images: PreparedImages) -> dict:
    """``evaluate_split`` on validation images, recorded in ``predictor.spec``: its metrics, and
    the uncertainty threshold that keeps ``spec.coverage_target`` of them unflagged."""
    metrics, uncertainty = evaluate_split(predictor, images)
    spec = predictor.spec
    spec.uncertainty_threshold = float(np.quantile(uncertainty, spec.coverage_target))
    spec.metrics = {k: float(v) for k, v in metrics.items()}
    return metrics


def model_spec(cfg: TrialConfig, data: PreparedSplits) -> ModelSpec:
    """The trial's ``ModelSpec``: the network, the codec, and the ``inference`` section, its
    steps fitted on the training heads (a second look's head range)."""
    inference = cfg.inference
    steps = [step.fit(train_ofd_px=training_ofd_px(data))
             for step in create_steps(inference.postprocess)]
    return ModelSpec(architecture=cfg.model.name, model_kwargs=cfg.model_kwargs(),
                     input_hw=cfg.input_hw, stride=cfg.model.output_stride, sigma=cfg.train.sigma,
                     softargmax_beta=cfg.train.softargmax_beta,
                     orientation=data.orientation.to_dict(), pairing=inference.pairing,
                     decode=inference.decode, window_sigmas=inference.window_sigmas,
                     postprocess=steps_to_config(steps),
                     coverage_target=inference.coverage_target,
                     data={"source": data.source, "split_seed": cfg.data.split_seed,
                           "val_fraction": cfg.data.val_fraction,
                           "test_fraction": cfg.data.test_fraction, "limit": cfg.data.limit,
                           "exclude_outliers": cfg.data.exclude_outliers},
                     trial_config=cfg.to_dict())


def training_ofd_px(data: PreparedSplits) -> np.ndarray:
    """(N,) the training heads' OFD lengths in input pixels."""
    return diameter_lengths(data.train.landmarks)[1]


@dataclass
class Trainer:
    """What one trial trains with: the loader, the model and its average, the optimizer."""

    loader: DataLoader
    model: torch.nn.Module
    ema: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype
    use_amp: bool

    @property
    def deployed(self) -> torch.nn.Module:
        """What is validated and saved: the weight average when there is one."""
        return self.model if self.ema is None else self.ema.module


def build_trainer(cfg: TrialConfig, data: PreparedSplits, spec: ModelSpec,
                  device: torch.device) -> Trainer:
    on_cuda = device.type == "cuda"
    train_set = HeatmapDataset(data.train, codec=spec.codec(), orientation=data.orientation,
                               augment=cfg.augment)
    weights = (head_size_weights(data.train, power=cfg.train.balance_head_size)
               if cfg.train.balance_head_size else None)
    loader = make_loader(train_set, batch_size=min(cfg.train.batch_size, len(train_set)),
                         shuffle=True, num_workers=cfg.train.num_workers, seed=cfg.train.seed,
                         pin_memory=on_cuda, weights=weights)
    model = create_model(cfg.model.name, **cfg.model_kwargs()).to(device)
    if on_cuda and cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr,
                                  weight_decay=cfg.train.weight_decay)
    steps_per_epoch = len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, total_steps=cfg.train.epochs * steps_per_epoch,
        warmup_steps=cfg.train.warmup_epochs * steps_per_epoch, min_ratio=cfg.train.min_lr_ratio))
    amp_dtype = torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float16
    use_amp = on_cuda and cfg.train.amp
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    # an exponential moving average of the weights is what is validated and saved: one epoch's
    # weights are noisy (validation jumps by 0.5 mm between neighbouring epochs without it)
    return Trainer(loader=loader, model=model, ema=make_ema(model, cfg.train.ema_decay),
                   optimizer=optimizer, schedule=schedule, scaler=scaler, device=device,
                   amp_dtype=amp_dtype, use_amp=use_amp)


def train_epoch(trainer: Trainer, cfg: TrialConfig, codec, epoch: int) -> dict[str, float]:
    """One pass over the loader: forward, loss, backward, clip, step; the mean loss terms."""
    t = trainer
    channels_last = t.device.type == "cuda" and cfg.train.channels_last
    t.model.train()
    sums: dict[str, float] = {}
    for images, heatmaps, keypoints in t.loader:
        images = images.to(t.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        heatmaps, keypoints = heatmaps.to(t.device), keypoints.to(t.device)
        with torch.autocast(t.device.type, dtype=t.amp_dtype, enabled=t.use_amp):
            pred = t.model(images)
        pred, mask_logits = split_mask(pred.float())
        coords, _ = codec.decode(pred, beta=cfg.train.softargmax_beta,
                                 pairing=cfg.inference.pairing)
        mask = None
        if mask_logits is not None:
            mask = (mask_logits, *codec.encode_head_region(keypoints))
        loss, terms = biometry_loss(pred, heatmaps, coords, keypoints, cfg.loss,
                                    coord_scale=float(cfg.input_hw[1]), mask=mask)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss ({loss.item()}) at epoch "
                                     f"{epoch}; lower train.lr or check the data")
        t.optimizer.zero_grad(set_to_none=True)
        t.scaler.scale(loss).backward()
        t.scaler.unscale_(t.optimizer)
        torch.nn.utils.clip_grad_norm_(t.model.parameters(), cfg.train.grad_clip)
        t.scaler.step(t.optimizer)
        t.scaler.update()
        t.schedule.step()
        if t.ema is not None:
            t.ema.update_parameters(t.model)
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    return {f"train_loss_{k}": v / max(1, len(t.loader)) for k, v in sums.items()}


def run_trial(cfg: TrialConfig, *, data: PreparedSplits | None = None, out_dir: str | Path,
              reporter: Reporter | None = None, resume_from: str | Path | None = None,
              log: Callable[[str], None] = print, hooks: TrialHooks | None = None) -> dict:
    """Train one config; return the best epoch's metrics. See the module docstring."""
    hooks = hooks or TrialHooks()
    out_dir = Path(out_dir)
    seed_everything(cfg.train.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    data = data or prepare_splits(cfg.data)  # decoded once (or handed in by the search)
    if tuple(data.input_hw) != cfg.input_hw:
        raise BiometryInputError(f"data prepared at {data.input_hw} but the config asks for "
                                 f"{cfg.input_hw} (data.input_h/input_w)")
    spec = model_spec(cfg, data)
    codec = spec.codec()
    trainer = build_trainer(cfg, data, spec, device)
    state = TrainerState()
    if resume_from is not None:
        state = load_trainer_state(resume_from, trainer.model, trainer.optimizer,
                                   trainer.schedule, cfg, ema=trainer.ema)
        log(f"resumed from {resume_from} after epoch {state.epoch}")
    predictor = LandmarkPredictor(trainer.deployed, spec, device=device)

    best_metrics: dict = {}
    best_weights = None  # the best epoch's deployed weights, for the post-processing sweep
    for epoch in range(state.epoch + 1, cfg.train.epochs + 1):
        hooks.on_epoch_start(epoch)
        started = time.perf_counter()
        trainer.loader.generator.manual_seed(cfg.train.seed * 100003 + epoch)
        losses = train_epoch(trainer, cfg, codec, epoch)
        train_seconds = time.perf_counter() - started

        # validate in mm and choose the uncertainty threshold for the target coverage
        trainer.deployed.eval()
        metrics = {**validate_into_spec(predictor, data.val), **losses}
        if math.isfinite(metrics[OBJECTIVE]) and metrics[OBJECTIVE] < state.best_value:
            state.best_value, state.best_epoch = metrics[OBJECTIVE], epoch
            best_metrics = dict(metrics)
            best_weights = {k: v.detach().clone() for k, v in trainer.deployed.state_dict().items()}
        state.epoch = epoch
        if epoch == cfg.train.epochs and cfg.inference.sweep:
            metrics.update(tune_postprocess(cfg, data, spec, best_weights, device=device, log=log))
        metrics.update(epoch_figures(trainer, state, epoch=epoch, started=started,
                                     train_seconds=train_seconds))
        log(epoch_line(metrics, epochs=cfg.train.epochs))

        # checkpoint: the model folder plus the trainer's state, handed to the reporter
        with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
            save_checkpoint(Path(tmp), trainer.model, spec, trainer.optimizer, trainer.schedule,
                            state, ema=trainer.ema)
            if reporter is not None:
                reporter(metrics, Path(tmp))
            else:
                keep_checkpoint(Path(tmp), out_dir, is_best=state.best_epoch == epoch)
        hooks.after_report(epoch)
    if reporter is None:
        if cfg.inference.sweep and (out_dir / "best").is_dir():
            set_model_postprocess(out_dir / "best", spec.postprocess)
        write_metrics(out_dir, best_metrics, state)
    return best_metrics


def epoch_figures(trainer: Trainer, state: TrainerState, *, epoch: int, started: float,
                  train_seconds: float) -> dict:
    loader = trainer.loader
    return {"epoch": epoch, "lr": trainer.optimizer.param_groups[0]["lr"],
            BEST_OBJECTIVE: state.best_value, "best_epoch": state.best_epoch,
            "epoch_seconds": time.perf_counter() - started,
            "train_images_per_s": len(loader) * loader.batch_size / max(train_seconds, 1e-9)}


def epoch_line(metrics: dict, *, epochs: int) -> str:
    return (f"epoch {metrics['epoch']}/{epochs}  loss {metrics.get('train_loss_total', 0):.4f}  "
            f"{OBJECTIVE} {metrics[OBJECTIVE]:.3f}  bpd {metrics['bpd_l1_mm']:.2f}  "
            f"ofd {metrics['ofd_l1_mm']:.2f}  hc {metrics['hc_l1_mm']:.2f} mm  "
            f"({metrics['epoch_seconds']:.1f}s)")


def tune_postprocess(cfg: TrialConfig, data: PreparedSplits, spec: ModelSpec, weights, *,
                     device, log: Callable[[str], None]) -> dict:
    """Sweep ``cfg.inference.sweep`` on validation with the best epoch's ``weights`` (the current
    ones when no epoch was finite); the kept steps go into ``spec`` and the returned metrics."""
    from trainables.sweep import sweep_postprocess

    model = create_model(cfg.model.name, **cfg.model_kwargs()).to(device)
    if weights is not None:
        model.load_state_dict(weights)
    result = sweep_postprocess(model.eval(), spec, data.val, sweep=cfg.inference.sweep,
                               train_ofd_px=training_ofd_px(data),
                               resamples=cfg.inference.sweep_resamples, seed=cfg.train.seed,
                               device=device)
    spec.postprocess = steps_to_config(result.steps)
    log(f"post-processing sweep: kept {result.chosen} (gain {result.gain_mm:.3f} mm; "
        + ", ".join(f"{k} {v:.3f}" for k, v in result.objectives.items()) + ")")
    return {**result.as_metrics(), "postprocess_steps": json.dumps(spec.postprocess)}


def make_ema(model: torch.nn.Module, decay: float):
    """The weight average that is validated and saved, or None when ``decay`` is 0.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the average
    forgets the random initial weights within the first epochs (a plain EMA at 0.99 still holds 7%
    of them after 10 epochs of 26 steps, and ASHA compares trials at those epochs).
    """
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel

    def ema(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        return averaged * d + current * (1.0 - d)

    return AveragedModel(model, avg_fn=ema, use_buffers=True)


def save_checkpoint(folder: Path, model, spec: ModelSpec, optimizer, schedule,
                    state: TrainerState, *, ema=None) -> None:
    """``model.pt`` holds the deployed weights (the average when there is one); ``trainer.pt``
    the optimizer, schedule, progress and, with an average, the raw weights and the average."""
    save_model_folder(folder, model if ema is None else ema.module, spec)
    trainer = {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
               "state": asdict(state)}
    if ema is not None:
        trainer["model"] = model.state_dict()
        trainer["ema"] = ema.state_dict()
    torch.save(trainer, folder / TRAINER_STATE)


def load_trainer_state(folder: str | Path, model, optimizer, schedule,
                       cfg: TrialConfig, *, ema=None) -> TrainerState:
    """Restore model, optimizer and schedule from a checkpoint folder (``weights_only=True``)."""
    from biometry.inference import load_model_spec

    folder = Path(folder)
    spec = load_model_spec(folder)
    if spec.trial_config and spec.trial_config.get("model") != cfg.to_dict()["model"]:
        raise BiometryInputError(f"{folder}: checkpoint was trained with model "
                                 f"{spec.trial_config.get('model')}, not {cfg.to_dict()['model']}")
    path = folder / "model.pt"
    try:  # a refused (non-tensor) or corrupt file is one line, naming it
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        path = folder / TRAINER_STATE
        trainer = torch.load(path, map_location="cpu", weights_only=True)
        if "model" in trainer:  # saved with a weight average: model.pt holds the average
            model.load_state_dict(trainer["model"])
        if ema is not None:
            if "ema" in trainer:
                ema.load_state_dict(trainer["ema"])
            else:  # resumed without an average before: start it from the current weights
                ema.module.load_state_dict(model.state_dict())
        optimizer.load_state_dict(trainer["optimizer"])
        schedule.load_state_dict(trainer["schedule"])
        return TrainerState(**trainer["state"])
    except FileNotFoundError:
        raise BiometryInputError(f"{path}: not found") from None
    except Exception as err:  # torch raises many types (UnpicklingError, RuntimeError, ...)
        raise BiometryInputError(f"{path}: cannot load the checkpoint "
                                 f"({type(err).__name__})") from None


def keep_checkpoint(checkpoint: Path, out_dir: Path, *, is_best: bool) -> None:
    """Standalone runs: ``out/checkpoint`` is the latest epoch, ``out/best`` the best model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.replace_dir(checkpoint, out_dir / "checkpoint")
    if is_best:
        atomic.replace_dir(checkpoint, out_dir / "best", files=("model.pt", "model.yaml"))


def write_metrics(out_dir: Path, best_metrics: dict, state: TrainerState) -> None:
    payload = {"objective": OBJECTIVE, "best_epoch": state.best_epoch, "epochs": state.epoch,
               **best_metrics}
    atomic.write_json(out_dir / "metrics.json", payload, default=float)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainables.train", description=__doc__)
    parser.add_argument("--config", required=True, help="trial YAML (configs/trial/*.yaml)")
    parser.add_argument("--data", help="HC18 folder or landmark CSV (overrides data.path)")
    parser.add_argument("--out", default="runs/trial", help="output folder (default: runs/trial)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # a corrupt PNG: one line
    return run_cli(lambda: train_from_args(args), debug=args.debug, also=(FloatingPointError,))


def train_from_args(args: argparse.Namespace) -> int:
    from trainables.faults import faults_from_env

    hooks = faults_from_env()  # None unless the reliability tests set BIOMETRY_FAULT
    overrides = {"data.path": args.data} if args.data else {}
    cfg = load_config(args.config, overrides=overrides)
    out_dir = Path(args.out)
    resume = out_dir / "checkpoint" if args.resume else None
    if resume is not None and not resume.exists() and (out_dir / "checkpoint.old").is_dir():
        resume = out_dir / "checkpoint.old"  # a crash between atomic.swap_dir's two renames
    if resume is not None and not (resume / TRAINER_STATE).is_file():
        raise BiometryInputError(f"{resume}: no checkpoint to resume from")
    out_dir.mkdir(parents=True, exist_ok=True)  # an unusable --out fails before training
    tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-").close()
    best = run_trial(cfg, out_dir=out_dir, resume_from=resume, hooks=hooks)
    print(f"best {OBJECTIVE} {best.get(OBJECTIVE, float('nan')):.3f} mm; model folder "
          f"{out_dir / 'best'}; metrics {out_dir / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
