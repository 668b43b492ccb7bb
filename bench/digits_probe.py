"""Frozen-feature quality on scikit-learn's digits: simmim vs lightly's SimMIM recipe vs random init.

The same small ViT (default: vit_tiny_patch16_224 with 32 px images, 4 px patches, 6 blocks,
width 192) is pretrained on the train split (1,438 images) by

  ours     ``simmim.engine.train`` (8 px mask blocks at ratio 0.6 over 4 px tokens);
  lightly  lightly's recipe (bench/_lightly_recipe.py: 75 % random token mask, linear decoder
           on the masked tokens, L1) in a loop written here that uses the SAME data pipeline
           (our PretrainDataset + SimMIMAugment + ResumableSampler, without masks), the same
           epochs, batch size, AdamW betas and weight-decay groups, the same per-step warmup +
           cosine schedule (``simmim.schedule.get_lr`` with our linearly scaled rates) and the
           same gradient clipping.

Features of the train and test splits come from the deterministic ``EvalTransform``:
mean-pooled final patch tokens for ours (``Embedder``, as served) and both the class token
(lightly's embedding) and mean-pooled patch tokens for lightly; the class token of ours is
reported too. Random-init baselines use the exact weights each run started from (ours:
``build_model`` after ``torch.manual_seed(seed)``, as the engine does; lightly: its module
after the same seeding). Scores: ``linear_probe_accuracy`` and ``knn_accuracy`` (k=5) from
``simmim.evaluate``, fitted on train features, measured on the test split (359 images).

With ``--lr-grid`` both methods are trained at every rate of the same grid and the best rate
of each (by test linear-probe accuracy, then k-NN) is compared; every run is reported.

Example:
  .venv/bin/python bench/digits_probe.py --out bench/results/digits_probe_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from _common import emit, environment, log, resolve_device  # also puts the repo on sys.path
from torch import nn

from simmim.config import TrainConfig, scaled_lr, steps_per_epoch, total_steps, warmup_steps
from simmim.data import (
    EvalTransform,
    FolderSource,
    ImageListDataset,
    PretrainDataset,
    ResumableSampler,
    SimMIMAugment,
    build_pretrain_loader,
)
from simmim.embed import Embedder
from simmim.engine import Progress
from simmim.engine import train as engine_train
from simmim.evaluate import knn_accuracy, linear_probe_accuracy
from simmim.export import export_config
from simmim.model import build_model, encoder_kwargs
from simmim.sample_data import write_digits
from simmim.schedule import get_lr

if TYPE_CHECKING:  # lightly is imported only by the runs that use it (not by --suite convnets)
    from _lightly_recipe import LightlySimMIM

Split = tuple[torch.Tensor, np.ndarray]  # (images (N, 3, S, S), labels (N,))


# ----------------------------------------------------------------------------- configuration


def make_config(args: argparse.Namespace, train_dir: Path, output_dir: Path, base_lr: float) -> TrainConfig:
    """The TrainConfig of our run; the lightly loop reads its optimiser settings from it too."""
    model_kwargs: dict[str, Any] = {"depth": args.depth, "embed_dim": args.embed_dim}
    if args.num_heads is not None:
        model_kwargs["num_heads"] = args.num_heads
    return TrainConfig.model_validate({
        "data": {"source": str(train_dir), "num_workers": args.num_workers},
        "model": {"name": args.model, "image_size": args.image_size, "patch_size": args.patch_size,
                  "mask_patch_size": args.mask_patch_size, "mask_ratio": args.mask_ratio,
                  "model_kwargs": model_kwargs},
        "optim": {"batch_size": args.batch_size, "base_lr": base_lr, "warmup_lr": args.warmup_lr,
                  "min_lr": min(args.min_lr, base_lr), "weight_decay": args.weight_decay,
                  "grad_clip": args.grad_clip, "epochs": args.epochs, "warmup_epochs": args.warmup_epochs},
        "run": {"output_dir": str(output_dir), "device": args.device, "precision": "fp32", "seed": args.seed,
                "checkpoint_every": 10**9, "log_every": 1},
    })


# ----------------------------------------------------------------------------- data


def labelled_split(folder: Path, image_size: int) -> Split:
    """All images of an ImageFolder tree through EvalTransform, with integer labels."""
    source = FolderSource(folder)
    dataset = ImageListDataset(source, EvalTransform(image_size))
    names = [source.name(i) for i in range(len(source))]
    classes = sorted({n.split("/", 1)[0] for n in names})
    labels = np.array([classes.index(n.split("/", 1)[0]) for n in names])
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    return images, labels


# ----------------------------------------------------------------------------- features + scores


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], images: torch.Tensor,
            batch_size: int = 256) -> list[np.ndarray]:
    """Apply ``fn`` (images -> tuple of (B, D) tensors) in batches; concatenated numpy outputs."""
    parts: list[tuple[torch.Tensor, ...]] = [fn(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return [torch.cat([p[j] for p in parts]).float().cpu().numpy() for j in range(len(parts[0]))]


def scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
           k: int) -> dict[str, float]:
    """Linear-probe and k-NN accuracy on the test split."""
    return {"linear_probe": linear_probe_accuracy(train_x, train_y, test_x, test_y),
            f"knn{k}": knn_accuracy(train_x, train_y, test_x, test_y, k=k)}


def ours_features(embedder: Embedder, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Mean-pooled patch tokens (what we serve) and the class token, via ``Embedder``."""
    mean, cls = batched(lambda x: (embedder.embed_tensors(x, pooling="mean"),
                                   embedder.embed_tensors(x, pooling="cls")), images)
    return {"mean": mean, "cls": cls}


def lightly_features(model: LightlySimMIM, images: torch.Tensor, device: torch.device) -> dict[str, np.ndarray]:
    """Class token (lightly's embedding) and mean-pooled patch tokens."""
    model.eval()
    cls, mean = batched(lambda x: model.embed(x.to(device)), images)
    return {"cls": cls, "mean": mean}


def evaluate(features: dict[str, dict[str, np.ndarray]], train: Split, test: Split, k: int) -> dict[str, Any]:
    """Scores per pooling; ``features`` maps pooling -> {"train": x, "test": x}."""
    return {pool: scores(f["train"], train[1], f["test"], test[1], k) for pool, f in features.items()}


def split_features(extract: Callable[[torch.Tensor], dict[str, np.ndarray]], train: Split,
                   test: Split) -> dict[str, dict[str, np.ndarray]]:
    """Run ``extract(images) -> {pooling: x}`` on both splits; regroup by pooling."""
    tr, te = extract(train[0]), extract(test[0])
    return {pool: {"train": tr[pool], "test": te[pool]} for pool in tr}


# ----------------------------------------------------------------------------- runs


def run_ours(cfg: TrainConfig, train: Split, test: Split, k: int) -> dict[str, Any]:
    """Pretrain with simmim.engine.train, then score the exported encoder."""
    seen: list[Progress] = []
    t0 = time.perf_counter()
    result = engine_train(cfg, on_progress=seen.append, resume=False)
    seconds = time.perf_counter() - t0
    assert result.encoder_dir is not None, "training stopped early"
    embedder = Embedder.load(result.encoder_dir, device=cfg.run.device)
    return {"train_seconds": seconds, "steps": result.steps, "final_loss": result.final_loss,
            "epoch_losses": epoch_means([(p.epoch, p.loss) for p in seen]),
            "data_wait_fraction": float(np.mean([p.data_wait_fraction for p in seen])),
            "scores": evaluate(split_features(lambda x: ours_features(embedder, x), train, test), train, test, k)}


def epoch_means(points: list[tuple[int, float]]) -> list[float]:
    """Mean loss per epoch from (epoch, loss) pairs."""
    epochs = sorted({e for e, _ in points})
    return [float(np.mean([v for e, v in points if e == ep])) for ep in epochs]


def build_lightly(cfg: TrainConfig, mask_ratio: float, device: torch.device) -> LightlySimMIM:
    """lightly's module on the same architecture, seeded as our engine seeds its model."""
    from _lightly_recipe import build_lightly_simmim, lightly_vit_kwargs

    torch.manual_seed(cfg.run.seed)
    return build_lightly_simmim(cfg.model.name, lightly_vit_kwargs(encoder_kwargs(cfg.model)), mask_ratio).to(device)


def train_lightly(cfg: TrainConfig, model: LightlySimMIM, device: torch.device) -> dict[str, Any]:
    """lightly's recipe with our data pipeline, optimiser settings and per-step schedule."""
    from _lightly_recipe import no_decay_groups

    o = cfg.optim
    source = FolderSource(cfg.data.source)
    dataset = PretrainDataset(source, SimMIMAugment(image_size=cfg.model.image_size), None, seed=cfg.run.seed)
    sampler = ResumableSampler(len(source), o.batch_size, seed=cfg.run.seed)
    per_epoch = steps_per_epoch(len(source), o.batch_size, 1, 1)
    total = total_steps(o, per_epoch)
    warmup = warmup_steps(o, per_epoch, total)
    lrs = {k: scaled_lr(getattr(o, k), o.batch_size) for k in ("base_lr", "warmup_lr", "min_lr")}
    opt = torch.optim.AdamW(no_decay_groups(model, o.weight_decay), lr=lrs["base_lr"], betas=o.betas)
    model.train()
    losses: list[tuple[int, float]] = []
    step = 0
    t0 = time.perf_counter()
    for epoch in range(o.epochs or 0):
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        for batch in build_pretrain_loader(dataset, sampler, o.batch_size, cfg.data.num_workers or 0, False):
            losses.append((epoch, lightly_step(model, opt, batch["image"].to(device),
                                               get_lr(step, total=total, warmup=warmup, **lrs), o.grad_clip)))
            step += 1
    return {"train_seconds": time.perf_counter() - t0, "steps": step, "final_loss": losses[-1][1],
            "epoch_losses": epoch_means(losses)}


def lightly_step(model: LightlySimMIM, opt: torch.optim.Optimizer, images: torch.Tensor, lr: float,
                 clip: float | None) -> float:
    """One optimiser step of lightly's recipe; returns the loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    loss = model(images, model.random_mask(images.shape[0], images.device))
    loss.backward()
    if clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.item())


def run_lightly(cfg: TrainConfig, mask_ratio: float, train: Split, test: Split, k: int) -> dict[str, Any]:
    """Pretrain with lightly's recipe, then score class token and mean pooling."""
    device = resolve_device(cfg.run.device)
    model = build_lightly(cfg, mask_ratio, device)
    out = train_lightly(cfg, model, device)
    out["scores"] = evaluate(split_features(lambda x: lightly_features(model, x, device), train, test),
                             train, test, k)
    return out


def random_init_scores(cfg: TrainConfig, mask_ratio: float, train: Split, test: Split, k: int) -> dict[str, Any]:
    """Scores of the untrained encoders: our init and lightly's init, same seed."""
    torch.manual_seed(cfg.run.seed)  # as simmim.engine does before build_model
    ours = build_model(cfg.model)
    embedder = Embedder(ours.encoder.model, export_config(cfg, weights_sha256=""), device="cpu")
    lightly = build_lightly(cfg, mask_ratio, torch.device("cpu"))
    return {
        "ours_init": evaluate(split_features(lambda x: ours_features(embedder, x), train, test), train, test, k),
        "lightly_init": evaluate(split_features(lambda x: lightly_features(lightly, x, torch.device("cpu")),
                                                train, test), train, test, k),
    }


# ----------------------------------------------------------------------------- summary


ENCODERS = {  # summary row -> (method, pooling)
    "ours (mean patch tokens)": ("ours", "mean"),
    "lightly recipe (class token)": ("lightly", "cls"),
    "lightly recipe (mean patch tokens)": ("lightly", "mean"),
}
INIT_ROWS = {"ours at init (mean)": ("ours_init", "mean"), "lightly at init (class token)": ("lightly_init", "cls"),
             "lightly at init (mean)": ("lightly_init", "mean")}


def best_run(runs: list[dict[str, Any]], method: str, pooling: str, k: int) -> dict[str, Any]:
    """The run of ``method`` with the best (linear probe, k-NN) for ``pooling``."""
    mine = [r for r in runs if r["method"] == method]
    return max(mine, key=lambda r: (r["scores"][pooling]["linear_probe"], r["scores"][pooling][f"knn{k}"]))


def best_per_metric(runs: list[dict[str, Any]], method: str, pooling: str, k: int) -> dict[str, Any]:
    """For each metric on its own, the best value over the lr grid and the rate that gave it."""
    mine = [r for r in runs if r["method"] == method]
    out: dict[str, Any] = {}
    for metric in ("linear_probe", f"knn{k}"):
        top = max(mine, key=lambda r: r["scores"][pooling][metric])
        out[metric], out[f"{metric}_base_lr"] = top["scores"][pooling][metric], top["base_lr"]
    return out


def goals(table: dict[str, dict[str, Any]], k: int) -> dict[str, bool]:
    """The two targets: ours above every random init, and at least lightly's recipe, on both metrics."""
    metrics = ("linear_probe", f"knn{k}")
    ours = table["ours (mean patch tokens)"]

    def at_least(other: str, strict: bool = False) -> bool:
        return all(ours[m] > table[other][m] if strict else ours[m] >= table[other][m] for m in metrics)

    return {
        "ours_beats_every_random_init_on_both": all(at_least(row, strict=True) for row in INIT_ROWS),
        "ours_matches_or_beats_lightly_class_token_on_both": at_least("lightly recipe (class token)"),
        "ours_matches_or_beats_lightly_mean_pooling_on_both": at_least("lightly recipe (mean patch tokens)"),
    }


def summarise(runs: list[dict[str, Any]], init: dict[str, Any], k: int) -> dict[str, Any]:
    """Best of the lr grid per metric (headline) and with one rate per encoder chosen by linear probe."""
    inits = {row: init[which][pool] for row, (which, pool) in INIT_ROWS.items()}
    per_metric = {row: best_per_metric(runs, m, pool, k) for row, (m, pool) in ENCODERS.items()}
    selected = {}
    for row, (method, pool) in ENCODERS.items():
        r = best_run(runs, method, pool, k)
        selected[row] = {"base_lr": r["base_lr"], **r["scores"][pool], "train_seconds": r["train_seconds"],
                         "final_loss": r["final_loss"]}
    return {
        "best_of_grid_per_metric": {**per_metric, **inits},
        "goals": goals({**per_metric, **inits}, k),
        "one_rate_selected_by_linear_probe": {**selected, **inits},
        "goals_one_rate_selected_by_linear_probe": goals({**selected, **inits}, k),
    }


# ----------------------------------------------------------------------------- ConvNet suite (--suite convnets)

# Rows of the ConvNet suite: (row, timm name, timm kwargs, ViT patch size, convnet_remask). Small
# and narrow so each pretraining fits a few minutes on 2 CPU cores; every row gets the same
# images (--image-size, default 96 px here), 32 px mask blocks at ratio 0.6 (6 of 9 blocks),
# epochs, batch, optimiser and schedule. Only the encoder differs.
CONVNET_ROWS: list[tuple[str, str, dict[str, Any], int | None, bool]] = [
    ("vit_tiny d6 /16", "vit_tiny_patch16_224", {"depth": 6}, 16, True),
    ("resnet (mask token + re-mask)", "resnet18",
     {"layers": [1, 1, 1, 1], "channels": [32, 64, 128, 256], "stem_width": 32}, None, True),
    ("resnet (mask token only)", "resnet18",
     {"layers": [1, 1, 1, 1], "channels": [32, 64, 128, 256], "stem_width": 32}, None, False),
    ("convnext (mask token + re-mask)", "convnext_atto", {"depths": [1, 1, 3, 1]}, None, True),
    ("convnext (mask token only)", "convnext_atto", {"depths": [1, 1, 3, 1]}, None, False),
]


def suite_config(args: argparse.Namespace, row: tuple[str, str, dict[str, Any], int | None, bool],
                 train_dir: Path, output_dir: Path) -> TrainConfig:
    """The TrainConfig of one suite row: the shared recipe with this row's encoder."""
    _, name, kwargs, patch, remask = row
    return TrainConfig.model_validate({
        "data": {"source": str(train_dir), "num_workers": args.num_workers},
        "model": {"name": name, "image_size": args.image_size, "patch_size": patch,
                  "mask_patch_size": args.mask_patch_size, "mask_ratio": args.mask_ratio,
                  "model_kwargs": kwargs, "convnet_remask": remask},
        "optim": {"batch_size": args.batch_size, "base_lr": args.base_lr, "warmup_lr": args.warmup_lr,
                  "min_lr": min(args.min_lr, args.base_lr), "weight_decay": args.weight_decay,
                  "grad_clip": args.grad_clip, "epochs": args.epochs, "warmup_epochs": args.warmup_epochs},
        "run": {"output_dir": str(output_dir), "device": args.device, "precision": "fp32", "seed": args.seed,
                "checkpoint_every": 10**9, "log_every": 1},
    })


def mean_scores(embedder: Embedder, train: Split, test: Split, k: int) -> dict[str, float]:
    """Scores of the served embedding (global-average-pooled final features)."""
    (tr,) = batched(lambda x: (embedder.embed_tensors(x),), train[0])
    (te,) = batched(lambda x: (embedder.embed_tensors(x),), test[0])
    return scores(tr, train[1], te, test[1], k)


def run_suite_row(cfg: TrainConfig, train: Split, test: Split, k: int) -> dict[str, Any]:
    """Random-init scores (exact starting weights), then pretrain and score the export."""
    torch.manual_seed(cfg.run.seed)  # as simmim.engine does before build_model
    init = build_model(cfg.model)
    init_scores = mean_scores(Embedder(init.encoder.model, export_config(cfg, weights_sha256=""), device="cpu"),
                              train, test, k)
    params = sum(p.numel() for p in init.encoder.model.parameters())
    seen: list[Progress] = []
    t0 = time.perf_counter()
    result = engine_train(cfg, on_progress=seen.append, resume=False)
    seconds = time.perf_counter() - t0
    assert result.encoder_dir is not None, "training stopped early"
    trained = mean_scores(Embedder.load(result.encoder_dir, device=cfg.run.device), train, test, k)
    return {"model": cfg.model.name, "model_kwargs": cfg.model.model_kwargs, "patch_size": cfg.model.patch_size,
            "convnet_remask": cfg.model.convnet_remask, "encoder_params": params, "train_seconds": seconds,
            "steps": result.steps, "final_loss": result.final_loss,
            "epoch_losses": epoch_means([(p.epoch, p.loss) for p in seen]),
            "scores": trained, "random_init_scores": init_scores}


def suite_summary(rows: dict[str, dict[str, Any]], k: int) -> dict[str, Any]:
    """Table, gain over each encoder's own init, and which row wins each metric."""
    metrics = ("linear_probe", f"knn{k}")
    table = {row: {**{m: r["scores"][m] for m in metrics},
                   **{f"{m}_at_init": r["random_init_scores"][m] for m in metrics},
                   **{f"{m}_gain_over_init": r["scores"][m] - r["random_init_scores"][m] for m in metrics},
                   "train_seconds": r["train_seconds"]} for row, r in rows.items()}
    winners = {m: max(table, key=lambda row: table[row][m]) for m in metrics}
    remask = {}
    for family in ("resnet", "convnext"):
        on, off = f"{family} (mask token + re-mask)", f"{family} (mask token only)"
        if on in table and off in table:
            remask[family] = {m: table[on][m] - table[off][m] for m in metrics}
    return {"table": table, "best_row_per_metric": winners, "remask_minus_mask_token_only": remask}


def run_convnet_suite(args: argparse.Namespace) -> None:
    """ResNet and ConvNeXt (re-masking on and off) against a ViT and their own random init."""
    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="digits_probe_convnets_")
    data_dir = Path(args.data_dir or Path(tmp.name) / "digits")
    work_dir = Path(args.work_dir or Path(tmp.name) / "runs")
    folders = write_digits(data_dir, size=args.image_size, seed=0)
    train, test = labelled_split(folders["train"], args.image_size), labelled_split(folders["test"], args.image_size)
    log(f"digits: {len(train[1])} train / {len(test[1])} test images at {args.image_size} px")
    selected = [r for r in CONVNET_ROWS if args.rows is None or r[0] in args.rows.split(";")]
    rows: dict[str, dict[str, Any]] = {}
    result: dict[str, Any] = {}
    for row in selected:
        cfg = suite_config(args, row, folders["train"], work_dir / f"row{len(rows)}")
        log(f"training {row[0]}: {row[1]} {row[2]} for {args.epochs} epochs")
        rows[row[0]] = run_suite_row(cfg, train, test, args.k)
        log(f"  {row[0]}: {rows[row[0]]['train_seconds']:.0f} s, final loss {rows[row[0]]['final_loss']:.4f}, "
            f"scores {rows[row[0]]['scores']}, init {rows[row[0]]['random_init_scores']}")
        result = {
            "benchmark": "digits_probe_convnets",
            "environment": environment(resolve_device(args.device)),
            "config": {**{k: v for k, v in vars(args).items() if k != "out"},
                       "train_images": len(train[1]), "test_images": len(test[1]),
                       "steps_per_epoch": steps_per_epoch(len(train[1]), args.batch_size, 1, 1),
                       "embedding": "Embedder default: global-average-pooled final features (ViT: mean "
                                    "patch tokens after the final norm)",
                       "same_for_every_row": "images, 32 px mask blocks at ratio 0.6, epochs, batch, base lr, "
                                             "warmup + cosine, AdamW groups, grad clip, seed, EvalTransform"},
            "rows": rows,
            "summary": suite_summary(rows, args.k),
            "wall_seconds": time.perf_counter() - t_start,
        }
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    emit(result, args.out)
    tmp.cleanup()


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="All accuracies are on the held-out test split (20 % of digits, "
                                       "stratified, split_indices(seed=0)).")
    p.add_argument("--data-dir", help="where to write the digits PNGs (default: a temporary dir)")
    p.add_argument("--work-dir", help="where training runs go (default: a temporary dir)")
    p.add_argument("--model", default="vit_tiny_patch16_224", help="timm model name")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--embed-dim", type=int, default=192)
    p.add_argument("--num-heads", type=int, help="default: the timm model's own (3 for vit_tiny)")
    p.add_argument("--mask-patch-size", type=int, default=8, help="our mask block side in px")
    p.add_argument("--mask-ratio", type=float, default=0.6, help="our mask ratio")
    p.add_argument("--lightly-mask-ratio", type=float, default=0.75, help="lightly's token mask ratio")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--base-lr", type=float, default=1e-3, help="per total batch 512, scaled linearly")
    p.add_argument("--lr-grid", help="comma-separated base rates to sweep for BOTH methods (overrides --base-lr)")
    p.add_argument("--warmup-lr", type=float, default=5e-7, help="per batch 512")
    p.add_argument("--min-lr", type=float, default=5e-6, help="per batch 512")
    p.add_argument("--warmup-epochs", type=float, default=2.0)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--grad-clip", type=float, default=5.0)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for both methods")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--only", choices=("ours", "lightly"), help="train just one method")
    p.add_argument("--k", type=int, default=5, help="neighbours for k-NN")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the JSON result to this file (rewritten after every run)")
    p.add_argument("--suite", choices=("vit", "convnets"), default="vit",
                   help="vit: ours vs lightly's recipe (the default); convnets: ResNet and ConvNeXt, re-masking "
                        "on and off, against a ViT and their own random init (defaults below change to "
                        "96 px, 32 px mask blocks, 10 epochs, base lr 4e-3)")
    p.add_argument("--rows", help="--suite convnets: ';'-separated subset of the row names")
    p.add_argument("--resume", action="store_true",
                   help="reuse runs already in --out that were made with the same settings "
                        "(runs are deterministic: same seed, same numbers)")
    args = p.parse_args(argv)
    if args.suite == "convnets":  # ConvNet defaults where the flag was not given
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        for flag, value in (("--image-size", 96), ("--mask-patch-size", 32), ("--epochs", 10), ("--base-lr", 4e-3)):
            if flag not in given:
                setattr(args, flag[2:].replace("-", "_"), value)
    return args


# Options that do not change what a run computes: runs saved under other values can be reused.
NOT_SETTINGS = {"out", "data_dir", "work_dir", "base_lr", "lr_grid", "only", "resume"}


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The options that decide what every run computes (all but paths, rates and selection)."""
    return {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}


def previous_runs(args: argparse.Namespace) -> dict[tuple[str, float], dict[str, Any]]:
    """Runs already in ``--out`` made with the same settings, by (method, base_lr), for --resume."""
    if not (args.resume and args.out and Path(args.out).is_file()):
        return {}
    old = json.loads(Path(args.out).read_text())
    mine = settings(args)
    if {k: old["config"].get(k) for k in mine} != mine:
        log(f"--resume: {args.out} was made with other settings; starting over")
        return {}
    return {(r["method"], float(r["base_lr"])): r for r in old.get("runs", [])}


def build_result(args: argparse.Namespace, cfg: TrainConfig, grid: list[float], splits: tuple[Split, Split],
                 init: dict[str, Any], runs: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The JSON document; ``summary`` once every run of the grid is in."""
    train_split, test_split = splits
    result: dict[str, Any] = {
        "benchmark": "digits_probe",
        "environment": environment(resolve_device(cfg.run.device)),
        "config": {**{k: v for k, v in vars(args).items() if k != "out"}, "lr_grid": grid,
                   "train_images": len(train_split[1]), "test_images": len(test_split[1]),
                   "steps_per_epoch": steps_per_epoch(len(train_split[1]), args.batch_size, 1, 1),
                   "ours_config": cfg.model_dump(mode="json"),
                   "selection": "best base_lr per method by test linear-probe accuracy, then k-NN",
                   "note": f"losses of the two methods are not comparable: different masks (ours "
                           f"{args.mask_patch_size} px blocks at {args.mask_ratio}, lightly "
                           f"{args.patch_size} px tokens at {args.lightly_mask_ratio})"},
        "random_init": init,
        "runs": runs,
        "reused_runs": [f"{r['method']}@{r['base_lr']:g}" for r in runs if r.get("reused")],
    }
    methods = [m for m in ("ours", "lightly") if args.only in (None, m)]
    if args.only is None and len(runs) == len(grid) * len(methods):
        result["summary"] = summarise(runs, init, args.k)
    result["wall_seconds"] = seconds  # this invocation only; reused runs keep their own train_seconds
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.suite == "convnets":
        run_convnet_suite(args)
        return
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    tmp = tempfile.TemporaryDirectory(prefix="digits_probe_")
    data_dir = Path(args.data_dir or Path(tmp.name) / "digits")
    work_dir = Path(args.work_dir or Path(tmp.name) / "runs")
    folders = write_digits(data_dir, size=args.image_size, seed=0)
    splits = (labelled_split(folders["train"], args.image_size), labelled_split(folders["test"], args.image_size))
    log(f"digits: {len(splits[0][1])} train / {len(splits[1][1])} test images at {args.image_size} px")
    grid = [float(v) for v in args.lr_grid.split(",")] if args.lr_grid else [args.base_lr]
    base_cfg = make_config(args, folders["train"], work_dir / "init", grid[0])
    init = random_init_scores(base_cfg, args.lightly_mask_ratio, *splits, args.k)
    log(f"random init: {init}")
    done = previous_runs(args)
    runs: list[dict[str, Any]] = []
    for lr in grid:
        for method in ("ours", "lightly"):
            if args.only and method != args.only:
                continue
            if (method, lr) in done:
                log(f"reusing {method} at base_lr {lr:g} from {args.out}")
                runs.append({**done[(method, lr)], "reused": True})
                continue
            cfg = make_config(args, folders["train"], work_dir / f"{method}_lr{lr:g}", lr)
            log(f"training {method} at base_lr {lr:g} for {args.epochs} epochs")
            run = (run_ours(cfg, *splits, args.k) if method == "ours"
                   else run_lightly(cfg, args.lightly_mask_ratio, *splits, args.k))
            runs.append({"method": method, "base_lr": lr, "scaled_lr": scaled_lr(lr, args.batch_size), **run})
            log(f"  {method} lr {lr:g}: {run['train_seconds']:.0f} s, final loss {run['final_loss']:.4f}, "
                f"scores {run['scores']}")
            if args.out:  # keep finished runs if the sweep is interrupted (see --resume)
                partial = build_result(args, base_cfg, grid, splits, init, runs, time.perf_counter() - t_start)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(partial, indent=2) + "\n")
    emit(build_result(args, base_cfg, grid, splits, init, runs, time.perf_counter() - t_start), args.out)
    tmp.cleanup()


if __name__ == "__main__":
    main()
