"""Input-pipeline throughput: JPEG files -> augmented batches on the device, and end to end.

Generates N 500x375 JPEGs (smooth random colour fields plus noise, quality 90) in a temporary
folder, then measures, through the same ``simmim.train_data.TrainData`` the engine uses:

  data_cpu_workers    decode "cpu": DataLoader workers decode with PIL and crop/resize/flip/
                      normalise; a sweep over --workers. img/s of batches arriving on the device.
  data_device_decode  decode "gpu": workers read bytes and draw crop/flip/mask; the main process
                      decodes with torchvision.io.decode_jpeg on the device and augments there
                      (on a CPU-only machine the same code with device=cpu).
  end_to_end          ``simmim.engine.train`` on the folder (model per device, see --help), for
                      each decode path: img/s and data-wait fraction of the engine's own progress
                      reports, after the first report (warmup, compilation). ``engine_step_only``
                      is the same engine with the data replaced by one batch repeated on the
                      device; ``ratio_to_step_only`` = end-to-end img/s / that.
  agreement           the two decode paths on the first images: crop boxes identical, pixel MAE.

Examples:
  .venv/bin/python bench/input_pipeline.py --out bench/results/input_pipeline_cpu.json
  python bench/input_pipeline.py --out bench/results/input_pipeline_cuda.json    # GPU host, unchanged
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import emit, environment, log, resolve_device, usable_cpus
from PIL import Image

from simmim.config import TrainConfig
from simmim.data import PretrainDataset, SimMIMAugment, open_source
from simmim.data.gpu_decode import DeviceAugment
from simmim.engine import Progress, train
from simmim.masking import MaskGenerator
from simmim.runtime import Runtime
from simmim.train_data import TrainData, build_train_data


def _write_jpeg(args: tuple[Path, int]) -> None:
    path, seed = args
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC), dtype=np.int16)
    img = np.clip(img + rng.integers(-12, 13, size=img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90)


def make_jpegs(root: Path, count: int) -> float:
    """``count`` 500x375 JPEGs under ``root``; returns their mean size in KiB."""
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(root / f"img_{i:06d}.jpg", i) for i in range(count)]
    with multiprocessing.Pool(max(1, usable_cpus())) as pool:
        pool.map(_write_jpeg, jobs, chunksize=32)
    return sum(p.stat().st_size for p, _ in jobs) / count / 1024


def _config(folder: Path, out: Path, device: torch.device, model: dict[str, Any], batch: int, decode: str,
            workers: int, steps: int, log_every: int) -> TrainConfig:
    return TrainConfig.model_validate({
        "data": {"source": str(folder), "num_workers": workers, "decode": decode},
        "model": model,
        "optim": {"batch_size": batch, "max_steps": steps, "warmup_steps": 2},
        "run": {"output_dir": str(out), "device": str(device), "log_every": log_every,
                "checkpoint_every": 10**9, "preview_images": 0, "tensorboard": False},
    })


def data_path(cfg: TrainConfig, device: torch.device, batches: int) -> dict[str, Any]:
    """img/s of batches arriving on ``device`` (after the first one: worker start-up)."""
    gen = MaskGenerator(cfg.model.image_size, cfg.model.mask_patch_size, 16, cfg.model.mask_ratio)
    data: TrainData = build_train_data(cfg, gen, Runtime(device, None))
    try:
        it = itertools.chain.from_iterable(data.epoch_batches(e) for e in itertools.count())
        first = next(it)
        first["image"].to(device)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(batches):
            b = next(it)
            b["image"].to(device, non_blocking=True)
        _sync(device)
        seconds = time.perf_counter() - t0
    finally:
        data.close()
    return {"img_per_s": batches * cfg.optim.batch_size / seconds, "batches": batches, "seconds": seconds,
            "num_workers": data.num_workers, "decode": cfg.data.decode}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def end_to_end(cfg: TrainConfig, step_only: bool = False) -> dict[str, Any]:
    """The engine's own img/s and data-wait fraction, over the reports after the first."""
    seen: list[Progress] = []
    original = TrainData.epoch_batches
    if step_only:
        def repeat(self: TrainData, epoch: int, start_batch: int = 0) -> Any:
            batch = next(original(self, epoch, start_batch))
            self.close()
            return itertools.repeat(batch)

        TrainData.epoch_batches = repeat  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        train(cfg, on_progress=seen.append, resume=False)
        wall = time.perf_counter() - t0
    finally:
        TrainData.epoch_batches = original  # type: ignore[method-assign]
    later = seen[1:] or seen
    return {"img_per_s": float(np.mean([p.images_per_sec for p in later])),
            "data_wait_fraction": float(np.mean([p.data_wait_fraction for p in later])),
            "reports": [{"step": p.step, "img_per_s": round(p.images_per_sec, 1),
                         "data_wait_fraction": round(p.data_wait_fraction, 4), "loss": round(p.loss, 5)}
                        for p in seen],
            "steps": cfg.optim.max_steps, "wall_seconds": wall, "decode": cfg.data.decode,
            "num_workers": cfg.data.num_workers}


def agreement(folder: Path, image_size: int, count: int) -> dict[str, Any]:
    """CPU vs device decode path (device=cpu) on the first ``count`` images, epoch 0."""
    source = open_source(str(folder))
    boxes: list[Any] = []

    class Recording(SimMIMAugment):
        def sample_box(self, width: int, height: int, rng: Any) -> tuple[int, int, int, int]:
            box = super().sample_box(width, height, rng)
            boxes.append(box)
            return box

    gen = MaskGenerator(image_size, 32, 16, 0.6)
    cpu = PretrainDataset(source, Recording(image_size=image_size), gen, seed=0)
    enc = PretrainDataset(source, SimMIMAugment(image_size=image_size), gen, seed=0, encoded=True)
    finish = DeviceAugment(enc, "cpu")
    same, maes = 0, []
    for i in range(min(count, len(source))):
        boxes.clear()
        ref, sample = cpu.sample(0, i), enc.sample(0, i, encoded=True)
        same += int(sample.get("box") == boxes[0])
        out = finish({"encoded": [sample], "index": torch.tensor([i]), "skipped": 0})["image"][0]
        maes.append(float((out - ref["image"]).abs().mean()))
    return {"images": len(maes), "identical_crop_boxes": same,
            "pixel_mae_normalised": {"mean": float(np.mean(maes)), "max": float(np.max(maes))},
            "pixel_mae_0_255": {"mean": float(np.mean(maes)) * 255 * 0.226,
                                "note": "approximate: normalised MAE x 255 x mean std"}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--num-images", type=int, help="JPEGs to generate (default 4096 on CUDA, 384 on CPU)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, help="default 128 on CUDA, 32 on CPU")
    p.add_argument("--workers", help="comma-separated worker counts for the CPU path "
                                     "(default 4,8,16 capped at the CPU count on CUDA; 0,2 on CPU)")
    p.add_argument("--device-decode-workers", type=int,
                   help="workers for the device-decode path (default min(8, CPUs) on CUDA, 2 on CPU)")
    p.add_argument("--batches", type=int, help="timed batches per data-path measurement (default 30 / 6)")
    p.add_argument("--steps", type=int, help="end-to-end training steps (default 100 on CUDA, 12 on CPU)")
    p.add_argument("--model", help="end-to-end model (default vit_base_patch16_224 on CUDA; a 4-block "
                                   "ViT-Ti on CPU)")
    p.add_argument("--skip-end-to-end", action="store_true")
    p.add_argument("--dir", help="reuse/generate the JPEGs here instead of a temporary folder")
    p.add_argument("--out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    cpus = usable_cpus()
    n = args.num_images or (4096 if cuda else 384)
    batch = args.batch_size or (128 if cuda else 32)
    batches = args.batches or (30 if cuda else 6)
    steps = args.steps or (100 if cuda else 12)
    sweep = ([int(w) for w in args.workers.split(",")] if args.workers
             else sorted({min(w, cpus) for w in (4, 8, 16)}) if cuda else [0, 2])
    dd_workers = args.device_decode_workers if args.device_decode_workers is not None else (
        min(8, cpus) if cuda else 2)
    model: dict[str, Any] = {"name": args.model or "vit_base_patch16_224", "image_size": args.image_size}
    if not cuda and not args.model:
        model["model_kwargs"] = {"depth": 4}
        model["name"] = "vit_tiny_patch16_224"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.dir) if args.dir else Path(tmp) / "jpegs"
        if not folder.is_dir() or len(list(folder.glob("*.jpg"))) < n:
            log(f"writing {n} JPEGs (500x375) to {folder}")
            kib = make_jpegs(folder, n)
        else:
            kib = sum(p.stat().st_size for p in folder.glob("*.jpg")) / len(list(folder.glob("*.jpg"))) / 1024
        result: dict[str, Any] = {"benchmark": "input_pipeline", "environment": environment(device),
                                  "config": {"images": n, "jpeg": f"500x375, quality 90, mean {kib:.0f} KiB",
                                             "image_size": args.image_size, "batch_size": batch,
                                             "timed_batches": batches, "end_to_end_steps": steps,
                                             "model": model, "usable_cpus": cpus},
                                  "data_cpu_workers": {}, "data_device_decode": {}, "end_to_end": {}}
        log("agreement of the two decode paths")
        result["agreement"] = agreement(folder, args.image_size, 64 if cuda else 32)
        runs = Path(tmp) / "runs"
        for w in sweep:
            cfg = _config(folder, runs / f"d{w}", device, model, batch, "cpu", w, steps, 10)
            log(f"data path, CPU decode, {w} workers")
            result["data_cpu_workers"][str(w)] = data_path(cfg, device, batches)
        cfg = _config(folder, runs / "dgpu", device, model, batch, "gpu", dd_workers, steps, 10)
        log(f"data path, device decode ({device}), {dd_workers} workers")
        result["data_device_decode"][str(dd_workers)] = data_path(cfg, device, batches)
        if not args.skip_end_to_end:
            log_every = max(1, steps // 5)
            best_cpu = max(sweep)
            e2e = {"engine_step_only": (_config(folder, runs / "so", device, model, batch, "cpu", 0, steps,
                                                log_every), True),
                   f"decode_cpu_{best_cpu}_workers": (_config(folder, runs / "ec", device, model, batch, "cpu",
                                                              best_cpu, steps, log_every), False),
                   f"decode_device_{dd_workers}_workers": (_config(folder, runs / "eg", device, model, batch,
                                                                   "gpu", dd_workers, steps, log_every), False)}
            for name, (cfg, step_only) in e2e.items():
                log(f"end to end: {name} ({steps} steps)")
                result["end_to_end"][name] = end_to_end(cfg, step_only=step_only)
            ref = result["end_to_end"]["engine_step_only"]["img_per_s"]
            for row in result["end_to_end"].values():
                row["ratio_to_step_only"] = row["img_per_s"] / ref
        result["summary"] = {
            "data_cpu_workers_img_per_s": {k: round(v["img_per_s"], 1) for k, v in result["data_cpu_workers"].items()},
            "data_device_decode_img_per_s": {k: round(v["img_per_s"], 1)
                                             for k, v in result["data_device_decode"].items()},
            "end_to_end": {k: {"img_per_s": round(v["img_per_s"], 1), "data_wait_fraction":
                               round(v["data_wait_fraction"], 3), "ratio_to_step_only": round(v["ratio_to_step_only"], 3)}
                           for k, v in result["end_to_end"].items()},
            "agreement": {"identical_crop_boxes": f"{result['agreement']['identical_crop_boxes']}/"
                                                  f"{result['agreement']['images']}",
                          "pixel_mae_normalised_mean": round(result["agreement"]["pixel_mae_normalised"]["mean"], 4)},
        }
        result["wall_seconds"] = time.perf_counter() - t0
    emit(result, args.out)


if __name__ == "__main__":
    main()
