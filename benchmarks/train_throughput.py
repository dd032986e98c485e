"""Training and inference images/s per architecture, and the data pipeline's share of a step.

    python benchmarks/train_throughput.py                  # every model, cpu + gpu preset sizes
    python benchmarks/train_throughput.py --skip-gpu-res   # only the cpu preset size
    python benchmarks/train_throughput.py --smoke          # seconds; writes *.smoke.json

For every name in ``biometry.models.list_models()``:

- ``model-only`` train step on synthetic tensors, exactly the trainer's CPU step (forward,
  soft-argmax decode, ``biometry_loss``, backward, gradient clip, AdamW step), and inference
  (``eval()``, ``no_grad``, forward + decode), at the cpu preset's input and model
  (128x192, batch 16, unet width 16 depth 4 stride 2) and at the gpu preset's (544x800, width 24,
  depth 5, stride 4; on a CPU only a couple of steps at a small batch, see ``--gpu-res-batch``).
- ``full`` train step: the same step fed by the trainer's own DataLoader
  (``trainables.train.make_loader`` over ``HeatmapDataset``: augmentation, endpoint order,
  z-score, heatmap encoding) with ``num_workers=1``, as in the cpu preset. The pipeline's share
  of a step is ``(full - model_only) / full``; target on 2 CPU cores: under 10%.
- the pipeline's own CPU cost per batch (``num_workers=0``, no model), which matters when every
  core is busy (two trials on two cores), and its images/s per worker at the gpu preset size
  (how many workers a GPU trial needs).

Timings are medians over ``--repeats`` x ``--steps`` single steps, taken in short blocks of
model-only, full and inference steps in turn, so that a change of load hits all three alike (the
first full steps of a block, which the worker prefetched meanwhile, are not timed); the load
average is recorded around each model.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    HC18_DIR, NO_GPU_NOTE, RESULTS_DIR, LoadWindow, log, median, write_result)

TARGET_PIPELINE_SHARE = 0.10
PREFETCH = 2  # torch DataLoader's default prefetch_factor (batches per worker)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", help="default: every name in list_models()")
    p.add_argument("--data", help=f"HC18 folder or landmark CSV for the pipeline (default: "
                                  f"{HC18_DIR} if present, else the bundled sample)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in the training process (the cpu preset uses 1)")
    p.add_argument("--steps", type=int, default=6, help="timed steps of each kind per repeat")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=5, help="repeats; the median is reported")
    p.add_argument("--num-workers", type=int, default=1,
                   help="DataLoader workers for the full step")
    p.add_argument("--skip-gpu-res", action="store_true", help="skip the gpu preset resolution")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="device for the gpu preset size (auto: cuda if present); the cpu "
                        "preset size is always measured on the CPU")
    p.add_argument("--gpu-res-batch", type=int, default=0,
                   help="batch at the gpu preset size (default: 2 on a CPU, where 16 needs many "
                        "GB and minutes per step; the preset's 16 on CUDA)")
    p.add_argument("--gpu-res-steps", type=int, default=3, help="timed steps at the gpu size")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, synthetic data; seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.repeats, args.gpu_res_steps = 2, 1, 1, 1
    return args


def preset_config(name: str, *, smoke: bool):
    """The preset's trial config, as the trainer would build it (smoke: tiny input and model)."""
    from search.cli import load_preset
    from trainables.config import config_from_dict

    trial = load_preset(name).trial
    if smoke:
        trial["data"] = {"input_h": 64, "input_w": 96}
        trial["model"] = {**trial["model"], "width": 4, "depth": 3, "output_stride": 2}
        trial["train"] = {**trial["train"], "batch_size": 4}
    trial["train"]["device"] = "cpu"
    return config_from_dict(trial, source=f"preset {name}")


def make_codec(cfg):
    from biometry.codec import HeatmapCodec

    return HeatmapCodec(input_hw=cfg.input_hw, stride=cfg.model.output_stride,
                        sigma=cfg.train.sigma)


class Stepper:
    """The trainer's training step (trainables/train.py) on one model: on CUDA with its AMP
    (bf16 where supported) and channels_last, as the gpu preset asks."""

    def __init__(self, cfg, name: str, codec, device: str = "cpu"):
        import torch

        from biometry.models import create_model

        torch.manual_seed(0)
        self.cfg, self.codec = cfg, codec
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.channels_last = self.cuda and cfg.train.channels_last
        self.model = create_model(name, **cfg.model_kwargs()).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.amp = self.cuda and cfg.train.amp
        self.amp_dtype = (torch.bfloat16 if self.cuda and torch.cuda.is_bf16_supported()
                          else torch.float16)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp
                                           and self.amp_dtype == torch.float16)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr,
                                           weight_decay=cfg.train.weight_decay)

    def _images(self, images):
        import torch

        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)

    def train_step(self, images, heatmaps, keypoints) -> None:
        import torch

        from biometry.losses import biometry_loss
        from biometry.models import split_mask

        self.model.train()
        images = self._images(images)
        heatmaps, keypoints = heatmaps.to(self.device), keypoints.to(self.device)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            pred = self.model(images)
        pred, mask_logits = split_mask(pred.float())
        coords, _ = self.codec.decode(pred, beta=self.cfg.train.softargmax_beta)
        mask = (None if mask_logits is None
                else (mask_logits, *self.codec.encode_head_region(keypoints)))
        loss, _ = biometry_loss(pred, heatmaps, coords, keypoints, self.cfg.loss,
                                coord_scale=float(self.cfg.input_hw[1]), mask=mask)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        float(loss.detach())  # the trainer reads each loss term back: a sync point

    def infer(self, images) -> None:
        import torch

        from biometry.models import split_mask

        self.model.eval()
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp_dtype,
                                             enabled=self.amp):
            coords, _ = self.codec.decode(split_mask(self.model(self._images(images)))[0],
                                          beta=self.cfg.train.softargmax_beta)
        coords.cpu()  # the predictor hands coordinates back on the CPU: a sync point


def synthetic_batch(cfg, codec, batch: int):
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    h, w = cfg.input_hw
    kpts = np.stack([rng.uniform([0.2 * w, 0.2 * h], [0.8 * w, 0.8 * h], size=(4, 2))
                     for _ in range(batch)]).astype(np.float32)
    heatmaps = np.stack([codec.encode(k) for k in kpts]).astype(np.float32)
    images = torch.randn(batch, 1, h, w)
    return images, torch.from_numpy(heatmaps), torch.from_numpy(kpts)


def per_step(fn, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - started) / steps


def prepare_data(cfg, data_path: str | None, *, limit: int = 0):
    import dataclasses

    from trainables.data import prepare_splits

    data_cfg = dataclasses.replace(cfg.data, path=data_path, limit=limit)
    return prepare_splits(data_cfg)


def make_train_loader(cfg, data, codec, *, num_workers: int, batch: int):
    from trainables.data import HeatmapDataset
    from trainables.train import make_loader

    dataset = HeatmapDataset(data.train, codec=codec, orientation=data.orientation,
                             augment=cfg.augment)
    return make_loader(dataset, batch_size=min(batch, len(dataset)), shuffle=True,
                       num_workers=num_workers, seed=cfg.train.seed, pin_memory=False)


def endless(loader):
    for epoch in itertools.count(1):
        loader.generator.manual_seed(epoch)  # as the trainer re-seeds each epoch
        yield from loader


def measure_cpu_res(args, cfg, data, models: list[str]) -> list[dict]:
    """Model-only, full (DataLoader) and inference steps at the cpu preset size."""
    import torch

    codec = make_codec(cfg)
    batch = cfg.train.batch_size
    synthetic = synthetic_batch(cfg, codec, batch)
    rows = []
    for name in models:
        stepper = Stepper(cfg, name, codec)
        loader = make_train_loader(cfg, data, codec, num_workers=args.num_workers, batch=batch)
        stream = endless(loader)
        with LoadWindow() as window:
            for _ in range(args.warmup):
                stepper.train_step(*synthetic)
                stepper.train_step(*next(stream))
            # short blocks of each kind in turn, so a change of load hits all three alike, and
            # the median over single steps shrugs off bursts. The worker prefetches while other
            # blocks run, so the first PREFETCH full steps of a block are not timed: the rest
            # are the trainer's steady state.
            model_only, full, infer = [], [], []
            for _ in range(args.repeats):
                model_only += [per_step(lambda: stepper.train_step(*synthetic), 1)
                               for _ in range(args.steps)]
                for _ in range(PREFETCH * args.num_workers):
                    stepper.train_step(*next(stream))
                full += [per_step(lambda: stepper.train_step(*next(stream)), 1)
                         for _ in range(args.steps)]
                infer += [per_step(lambda: stepper.infer(synthetic[0]), 1)
                          for _ in range(args.steps)]
        del stream, loader  # stops the persistent worker
        m, f, i = median(model_only), median(full), median(infer)
        share = max(0.0, (f - m) / f)
        row = {"model": name, "input_hw": list(cfg.input_hw), "batch": batch,
               "model_kwargs": cfg.model_kwargs(), "threads": torch.get_num_threads(),
               "num_workers": args.num_workers,
               "model_only_step_s": m, "full_step_s": f, "inference_batch_s": i,
               "train_images_per_s_model_only": batch / m, "train_images_per_s_full": batch / f,
               "inference_images_per_s": batch / i, "pipeline_share_of_step": share,
               "pipeline_target_met": share < TARGET_PIPELINE_SHARE,
               "steps_s": {"model_only": model_only, "full": full, "inference": infer},
               "pipeline_share_per_repeat": [
                   max(0.0, 1 - median(model_only[k:k + args.steps])
                       / median(full[k:k + args.steps]))
                   for k in range(0, len(full), args.steps)],
               "load": window.as_dict()}
        log(f"{name} {cfg.input_hw}: train {row['train_images_per_s_model_only']:.1f} img/s "
            f"model-only, {row['train_images_per_s_full']:.1f} img/s with DataLoader "
            f"(pipeline share {share:.1%}); inference {row['inference_images_per_s']:.1f} img/s; "
            f"load {window.before} -> {window.after}")
        rows.append(row)
    return rows


def measure_pipeline_cost(args, cfg, data, *, label: str) -> dict:
    """The pipeline alone, in this process (num_workers=0): seconds per batch of CPU work."""
    import dataclasses

    codec = make_codec(cfg)
    batch = cfg.train.batch_size
    loader = make_train_loader(cfg, data, codec, num_workers=0, batch=batch)
    stream = endless(loader)
    with LoadWindow() as window:
        for _ in range(args.warmup):
            next(stream)
        times = [per_step(lambda: next(stream), args.steps) for _ in range(args.repeats)]
    s = median(times)
    log(f"pipeline alone at {cfg.input_hw} ({label}): {s * 1000:.1f} ms per batch of {batch} = "
        f"{batch / s:.0f} img/s per worker")
    return {"input_hw": list(cfg.input_hw), "batch": batch, "batch_s": s,
            "images_per_s_per_worker": batch / s, "repeats_batch_s": times,
            "augment": dataclasses.asdict(cfg.augment),
            "load": window.as_dict()}


def measure_gpu_res(args, cfg, models: list[str], *, device: str) -> list[dict]:
    """The gpu preset's input and model: a few steps at a small batch on a CPU, the preset's
    batch on CUDA."""
    import torch

    codec = make_codec(cfg)
    batch = args.gpu_res_batch or (cfg.train.batch_size if device == "cuda" else 2)
    synthetic = synthetic_batch(cfg, codec, batch)
    rows = []
    for name in models:
        stepper = Stepper(cfg, name, codec, device=device)
        with LoadWindow() as window:
            stepper.train_step(*synthetic)  # warm-up
            train = [per_step(lambda: stepper.train_step(*synthetic), 1)
                     for _ in range(args.gpu_res_steps)]
            stepper.infer(synthetic[0])
            infer = [per_step(lambda: stepper.infer(synthetic[0]), 1)
                     for _ in range(args.gpu_res_steps)]
            stepper.sync()
        t, i = median(train), median(infer)
        row = {"model": name, "device": str(stepper.device), "amp": stepper.amp,
               "input_hw": list(cfg.input_hw), "batch": batch,
               "model_kwargs": cfg.model_kwargs(), "threads": torch.get_num_threads(),
               "model_only_step_s": t, "inference_batch_s": i,
               "train_images_per_s_model_only": batch / t, "inference_images_per_s": batch / i,
               "steps": {"train_step_s": train, "inference_batch_s": infer},
               "load": window.as_dict()}
        log(f"{name} {cfg.input_hw} batch {batch}: train {batch / t:.2f} img/s, inference "
            f"{batch / i:.2f} img/s ({t:.1f} s per train step); load {window.before} -> "
            f"{window.after}")
        rows.append(row)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from biometry.models import list_models

    torch.set_num_threads(args.threads)
    models = args.models or list_models()
    data_path = args.data or (str(HC18_DIR) if HC18_DIR.is_dir() else None)
    tmp = None
    if args.smoke:
        from biometry.io import write_synthetic_dataset

        tmp = tempfile.TemporaryDirectory(prefix="bench-smoke-")
        data_path = str(write_synthetic_dataset(tmp.name, n=16, seed=0))
    started = time.time()

    cpu_cfg = preset_config("cpu", smoke=args.smoke)
    log(f"preparing data {data_path or 'bundled sample'} at {cpu_cfg.input_hw}")
    cpu_data = prepare_data(cpu_cfg, data_path)
    cpu_rows = measure_cpu_res(args, cpu_cfg, cpu_data, models)
    cpu_pipeline = measure_pipeline_cost(args, cpu_cfg, cpu_data, label="cpu preset")
    for row in cpu_rows:  # when both cores are busy the worker's CPU time is not hidden
        row["pipeline_cpu_share_saturated"] = (
            cpu_pipeline["batch_s"] / (cpu_pipeline["batch_s"] + row["model_only_step_s"]))

    device = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    gpu_section: dict = {"device": device, "gpu": NO_GPU_NOTE if device == "cpu" else
                         torch.cuda.get_device_name(0)}
    if args.skip_gpu_res:
        gpu_section["measurement"] = "skipped (--skip-gpu-res)"
    else:
        gpu_cfg = preset_config("gpu", smoke=args.smoke)
        rows = measure_gpu_res(args, gpu_cfg, models, device=device)
        gpu_section["cpu_rows" if device == "cpu" else "cuda_rows"] = rows
        gpu_section["note"] = (
            f"on the CPU with batch {rows[0]['batch']} (not the preset's 16: memory and "
            f"minutes per step; images/s on a CPU barely depend on batch size), "
            f"{args.gpu_res_steps} timed steps after one warm-up" if device == "cpu" else
            f"on CUDA, batch {rows[0]['batch']}, AMP and channels_last as the gpu preset; "
            f"{args.gpu_res_steps} timed steps after one warm-up (never run at the time of "
            f"writing: no GPU was lent)")
        limit = 16 if args.smoke else 64
        log(f"preparing the first {limit} images at {gpu_cfg.input_hw}")
        gpu_data = prepare_data(gpu_cfg, data_path, limit=limit)
        gpu_section["pipeline_alone"] = measure_pipeline_cost(args, gpu_cfg, gpu_data,
                                                              label="gpu preset")
        per_worker = gpu_section["pipeline_alone"]["images_per_s_per_worker"]
        gpu_section["workers_to_feed_training"] = {
            r["model"]: r["train_images_per_s_model_only"] / per_worker for r in rows}

    shares = [r["pipeline_share_of_step"] for r in cpu_rows]
    payload = {
        "settings": {"models": models, "data": data_path or "bundled sample", "device": device,
                     "threads": args.threads, "steps": args.steps, "warmup": args.warmup,
                     "repeats": args.repeats, "num_workers": args.num_workers,
                     "gpu_res_batch": args.gpu_res_batch, "gpu_res_steps": args.gpu_res_steps},
        "target": {"pipeline_share_of_step_below": TARGET_PIPELINE_SHARE,
                   "max_share": max(shares), "met": max(shares) < TARGET_PIPELINE_SHARE},
        "cpu_preset": {"rows": cpu_rows, "pipeline_alone": cpu_pipeline},
        "gpu_preset": gpu_section,
        "wall_s": time.time() - started,
    }
    path = write_result("train_throughput", payload, out_dir=args.out_dir, smoke=args.smoke)
    log(f"wrote {path}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
