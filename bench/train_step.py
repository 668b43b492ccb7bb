"""Training-step throughput: simmim's SimMIM vs lightly's SimMIM recipe vs a plain timm ViT.

One iteration = one full training step (forward, backward, AdamW step, zero_grad) on random
images already on the device; every config uses the same timm ViT, batch and image size.

Configs:
  ours                 simmim ``build_model``; masks from our ``MaskGenerator`` (pre-drawn, on
                       the device, cycled); AdamW(model.param_groups(0.05)); grad clip 5.0; the
                       loss stays on the device (the engine reads it every run.log_every steps).
  ours_compiled        the same with ``torch.compile(model)`` (default on CUDA; CPU: --compile);
                       what ``simmim.engine`` runs on CUDA by default (run.compile: auto).
  microsoft_formulation  microsoft/SimMIM's step on the same timm ViT: the same model maths
                       (mask token, 1x1 conv + PixelShuffle, masked L1), unfused attention
                       (q @ k^T, softmax, @ v, as its ViT computes it), a ``loss.item()`` every
                       step, grad clip 5.0, eager.
  ours_noclip          ``ours`` without gradient clipping: lightly's recipe does not clip, so
                       this separates the cost of the recipe from the cost of the code.
  lightly_recipe_fp32  lightly's recipe (bench/_lightly_recipe.py), fp32 (TF32 matmuls on CUDA);
                       its 75 % token mask is drawn on the device inside the step, as it does.
  lightly_recipe_bf16  the same under bf16 autocast (default on CUDA only).
  timm_plain           plain timm ViT: forward_features -> mean -> backward -> AdamW; a lower
                       bound for the cost of the encoder alone.
  timm_plain_compiled  the same under ``torch.compile`` (the best public number in ANCHORS.md).

Suites: vit (the configs above), convnets, swin (Swin-B 192 px on CUDA), embed (encoder-only
inference, mean-pooled, eager and compiled, batch 256 bf16 on CUDA). --find-max-batch MODELS
finds the largest batch of ``ours`` that fits (doubling, then bisection on failure), one fresh
process per try. The vit suite also checks that the compiled path gives the eager losses
(same weights, data and masks, a few steps; max abs difference).

Each config runs in its own worker process, so peak memory is per config:
``torch.cuda.max_memory_allocated`` on CUDA, the growth of ``ru_maxrss`` since the worker's
imports on CPU. Workers are started one at a time (build + warmup), then timed in rounds
that interleave the configs (rotating the order), and the median round is reported. Only one
worker computes at a time; the others wait on a pipe. On CPU, workers run with fixed glibc
malloc settings (CPU_MALLOC_ENV; --default-malloc to turn off) and the JSON records each
round, so the spread between rounds shows how noisy the machine was.

Examples:
  .venv/bin/python bench/train_step.py --out bench/results/train_step_cpu.json
  python bench/train_step.py --out bench/results/train_step_cuda.json   # on a GPU host: ViT-B/16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import timm
import torch
from _common import emit, environment, log, resolve_device  # also puts the repo on sys.path
from torch import nn

from simmim.config import ModelConfig
from simmim.model import build_mask_generator, build_model, encoder_kwargs

ALL_CONFIGS = ("ours", "ours_compiled", "ours_noclip", "ours_mask_token_only", "microsoft_formulation",
               "lightly_recipe_fp32", "lightly_recipe_bf16", "timm_plain", "timm_plain_compiled",
               "embed_eager", "embed_compiled")
SWIN_MODELS = {"cuda": ("swin_base_patch4_window7_224", 192), "cpu": ("swin_tiny_patch4_window7_224", 64)}
SWIN_CONFIGS = ("ours", "ours_compiled", "timm_plain")
EMBED_CONFIGS = ("embed_eager", "embed_compiled")
# --suite convnets: (model, timm kwargs) on CUDA (224 px, batch 128) and on CPU (small and narrow, 96 px).
CONVNET_MODELS = {
    "cuda": [("resnet50", {}), ("convnext_tiny", {})],
    "cpu": [("resnet18", {"layers": [1, 1, 1, 1], "channels": [32, 64, 128, 256], "stem_width": 32}),
            ("convnext_atto", {"depths": [1, 1, 3, 1]})],
}
CONVNET_CONFIGS = ("ours", "ours_mask_token_only", "timm_plain")
MASK_POOL = 8  # distinct mask batches cycled by `ours`
# glibc malloc settings for CPU workers: serve every tensor below 32 MiB from the heap and never
# hand freed memory back, so steps do not page-fault fresh memory in. With glibc's adaptive
# defaults some worker processes fault in ~150 MB per step and others almost none, which
# swings a config's speed by up to ~20 % from one run to the next. The same for every config.
CPU_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**40)}


@dataclass(frozen=True)
class Spec:
    """Everything a worker needs to build one config (sent as JSON)."""

    config: str
    device: str
    model: str
    image_size: int
    batch_size: int
    precision: str
    mask_patch_size: int
    mask_ratio: float
    lightly_mask_ratio: float
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    patch_size: int | None = None
    warmup: int = 3
    round_warmup: int = 0
    seed: int = 0
    convnet_remask: bool = True


# ----------------------------------------------------------------------------- worker side


def _autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def _config_precision(spec: Spec) -> str:
    if spec.config.startswith("lightly_recipe_"):
        return spec.config.removeprefix("lightly_recipe_")
    return spec.precision


def _model_config(spec: Spec) -> ModelConfig:
    return ModelConfig(name=spec.model, image_size=spec.image_size, patch_size=spec.patch_size,
                       mask_patch_size=spec.mask_patch_size, mask_ratio=spec.mask_ratio,
                       model_kwargs=spec.model_kwargs,
                       convnet_remask=spec.convnet_remask and spec.config != "ours_mask_token_only")


def _adamw(params: Any, device: torch.device, lr: float = 1e-4, weight_decay: float = 0.05) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")


def _build_ours(spec: Spec, device: torch.device, images: torch.Tensor, compiled: bool, clip: bool = True,
                microsoft: bool = False) -> tuple[Callable[[int], None], nn.Module, dict[str, Any]]:
    cfg = _model_config(spec)
    model = build_model(cfg).to(device)
    if microsoft:  # its ViT computes attention as q @ k^T -> softmax -> @ v
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
    gen = build_mask_generator(cfg, model.encoder)
    rng = np.random.default_rng(spec.seed)
    masks = torch.from_numpy(np.stack([gen(rng) for _ in range(MASK_POOL * spec.batch_size)]))
    masks = masks.view(MASK_POOL, spec.batch_size, *masks.shape[1:]).to(device)  # uint8 (P, B, g, g)
    opt = _adamw(model.param_groups(0.05), device)
    fn = torch.compile(model) if compiled else model
    amp = _config_precision(spec)

    def step(i: int) -> None:
        with _autocast(device, amp):
            loss, _ = fn(images, masks[i % MASK_POOL])
        loss.backward()
        if microsoft:
            float(loss.item())  # microsoft's loop reads the loss every step
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    info = {"mask": f"{spec.mask_patch_size} px blocks, ratio {spec.mask_ratio}, "
                    f"{gen.num_masked}/{gen.num_blocks} blocks = "
                    f"{gen.num_masked / gen.num_blocks:.3f} of tokens",
            "optimizer": f"AdamW(param_groups(0.05)), {'clip_grad_norm 5.0' if clip else 'no clip'}"
                         + (", loss.item() per step, unfused attention" if microsoft else ", no host sync"),
            "tokens": gen.token_grid**2}
    return step, model, info


def _build_lightly(spec: Spec, device: torch.device,
                   images: torch.Tensor) -> tuple[Callable[[int], None], nn.Module, dict[str, Any]]:
    # only these configs need lightly
    from _lightly_recipe import build_lightly_simmim, lightly_vit_kwargs

    kwargs = lightly_vit_kwargs(encoder_kwargs(_model_config(spec)))
    model = build_lightly_simmim(spec.model, kwargs, spec.lightly_mask_ratio).to(device)
    opt = _adamw(model.parameters(), device, lr=1.5e-4, weight_decay=0.01)  # lightly example's AdamW
    amp = _config_precision(spec)

    def step(i: int) -> None:
        idx_mask = model.random_mask(images.shape[0], device)
        with _autocast(device, amp):
            loss = model(images, idx_mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    masked = model.random_mask(1, device).shape[1]
    info = {"mask": f"random token mask, ratio {spec.lightly_mask_ratio}: {masked}/"
                    f"{model.sequence_length - 1} tokens, drawn on the device every step",
            "optimizer": "AdamW(model.parameters(), lr=1.5e-4) as lightly's example, no clip",
            "tokens": model.sequence_length - 1}
    return step, model, info


def _build_timm_plain(spec: Spec, device: torch.device, images: torch.Tensor,
                      compiled: bool = False) -> tuple[Callable[[int], None], nn.Module, dict[str, Any]]:
    model = timm.create_model(spec.model, pretrained=False, **encoder_kwargs(_model_config(spec))).to(device)
    opt = _adamw(model.parameters(), device)
    amp = _config_precision(spec)
    features = torch.compile(model.forward_features) if compiled else model.forward_features

    def step(i: int) -> None:
        with _autocast(device, amp):
            loss = features(images).float().mean()  # type: ignore[operator]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model, {"optimizer": "AdamW(model.parameters()), no clip", "mask": None}


def _build_embed(spec: Spec, device: torch.device, images: torch.Tensor,
                 compiled: bool) -> tuple[Callable[[int], None], nn.Module, dict[str, Any]]:
    """Encoder-only inference as ``simmim.embed.Embedder`` runs it: mean-pooled patch tokens."""
    from simmim.backbones import create_encoder

    cfg = _model_config(spec)
    model = create_encoder(cfg.name, pos_embed=cfg.pos_embed, **encoder_kwargs(cfg)).model.to(device).eval()
    fn = torch.compile(model) if compiled else model
    amp = _config_precision(spec)

    def step(i: int) -> None:
        with torch.inference_mode(), _autocast(device, amp):
            fn(images).float()

    return step, model, {"mode": "inference, mean-pooled embeddings", "mask": None}


def _build(spec: Spec, device: torch.device,
           images: torch.Tensor) -> tuple[Callable[[int], None], nn.Module, dict[str, Any]]:
    if spec.config in ("ours", "ours_compiled", "ours_noclip", "ours_mask_token_only", "microsoft_formulation"):
        return _build_ours(spec, device, images, compiled=spec.config == "ours_compiled",
                           clip=spec.config != "ours_noclip", microsoft=spec.config == "microsoft_formulation")
    if spec.config.startswith("lightly_recipe_"):
        return _build_lightly(spec, device, images)
    if spec.config in ("timm_plain", "timm_plain_compiled"):
        return _build_timm_plain(spec, device, images, compiled=spec.config == "timm_plain_compiled")
    if spec.config in EMBED_CONFIGS:
        return _build_embed(spec, device, images, compiled=spec.config == "embed_compiled")
    raise ValueError(f"unknown config {spec.config!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device, baseline_rss_kib: int) -> dict[str, Any]:
    if device.type == "cuda":
        return {"kind": "torch.cuda.max_memory_allocated",
                "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"kind": "ru_maxrss growth since the worker's imports (RSS high-water mark)",
            "peak_mib": (peak_kib - baseline_rss_kib) / 1024, "process_peak_rss_mib": peak_kib / 1024}


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker_main(spec: Spec) -> None:
    """Build one config, warm it up, then time steps on request until told to quit."""
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(spec.seed)
    images = torch.randn(spec.batch_size, 3, spec.image_size, spec.image_size, device=device)
    step, model, info = _build(spec, device, images)
    if spec.config not in EMBED_CONFIGS:
        model.train()
    info["params_trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info["precision"] = _config_precision(spec)
    t0 = time.perf_counter()
    i = 0
    for _ in range(spec.warmup):
        step(i)
        i += 1
    _sync(device)
    info["warmup_seconds"] = time.perf_counter() - t0
    _reply({"ready": True, "info": info})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            _reply({"memory": _peak_memory(device, baseline)})
            return
        for _ in range(spec.round_warmup):  # untimed: caches and clocks back after idling
            step(i)
            i += 1
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(cmd["iters"]):
            step(i)
            i += 1
        _sync(device)
        _reply({"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start})


# ----------------------------------------------------------------------------- parent side


class Worker:
    """A running worker process for one config, driven over its stdin/stdout."""

    def __init__(self, spec: Spec, env: dict[str, str]) -> None:
        self.spec = spec
        cmd = [sys.executable, __file__, "--worker-spec", json.dumps(asdict(spec))]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, **env})
        self.info = self._read()["info"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"worker {self.spec.config} exited with code {self.proc.returncode}")
        return json.loads(line)

    def ask(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def quit(self) -> dict[str, Any]:
        reply = self.ask({"cmd": "quit"})
        self.proc.wait(timeout=60)
        return reply


def default_configs(device: torch.device, compile_flag: bool | None, precision: str) -> list[str]:
    """CUDA: ours (eager, compiled, no clip), microsoft's formulation, lightly's recipe fp32 and
    bf16, plain timm eager and compiled. CPU: the same without the compiled ones (only with
    --compile) and with lightly's recipe at --precision only."""
    cuda = device.type == "cuda"
    compiled = bool(compile_flag or (compile_flag is None and cuda))
    configs = ["ours"] + (["ours_compiled"] if compiled else []) + ["ours_noclip", "microsoft_formulation"]
    configs += ["lightly_recipe_fp32", "lightly_recipe_bf16"] if cuda else [f"lightly_recipe_{precision}"]
    configs += ["timm_plain"] + (["timm_plain_compiled"] if compiled else [])
    return configs


def run_rounds(workers: dict[str, Worker], rounds: int,
               iters: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds per step for each config and round.

    The start of the order rotates each round so no config always follows the same one.
    """
    names = list(workers)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            reply = workers[name].ask({"cmd": "run", "iters": iters})
            wall[name].append(reply["seconds"] / iters)
            cpu[name].append(reply["cpu_seconds"] / iters)
            log(f"round {r + 1}/{rounds} {name:20s} {reply['seconds'] / iters * 1e3:8.1f} ms/step")
    return wall, cpu


def summarise(wall: dict[str, list[float]], cpu: dict[str, list[float]], workers: dict[str, Worker],
              memory: dict[str, dict[str, Any]], batch_size: int) -> dict[str, Any]:
    """Per config: img/s and ms/step of the median round, the best round, every round, peak
    memory, and the ratios to lightly's recipe at the same precision (median and best round)."""
    out: dict[str, Any] = {}
    for name, times in wall.items():
        med, best = statistics.median(times), min(times)
        out[name] = {"img_per_s": batch_size / med, "ms_per_step": med * 1e3,
                     "img_per_s_best_round": batch_size / best,
                     "ms_per_step_rounds": [round(t * 1e3, 2) for t in times],
                     "cpu_ms_per_step": statistics.median(cpu[name]) * 1e3,
                     "peak_memory_mib": memory[name]["peak_mib"], "memory": memory[name],
                     **workers[name].info}
    for row in out.values():
        ref = f"lightly_recipe_{row['precision']}"
        found = ref in out
        row["reference"] = ref if found else None
        row["ratio_to_lightly"] = row["img_per_s"] / out[ref]["img_per_s"] if found else None
        row["ratio_to_lightly_best_round"] = (
            row["img_per_s_best_round"] / out[ref]["img_per_s_best_round"] if found else None)
    return out


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The few numbers a reader wants first, rounded."""
    def r(v: float | None, nd: int) -> float | None:
        return None if v is None else round(v, nd)
    return {name: {"img_per_s": r(row["img_per_s"], 1), "ms_per_step": r(row["ms_per_step"], 1),
                   "ratio_to_lightly": r(row["ratio_to_lightly"], 3),
                   "ratio_to_lightly_best_round": r(row["ratio_to_lightly_best_round"], 3),
                   "peak_memory_mib": r(row["peak_memory_mib"], 0)} for name, row in results.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Defaults: CUDA -> vit_base_patch16_224, 224 px, batch 128, bf16, 10 warmup, 20 iters x 3 "
               "rounds; CPU -> vit_tiny_patch16_224, 96 px, batch 32, fp32, 3 warmup, 2 iters x 15 rounds. "
               "ratio_to_lightly = img/s of the config / img/s of lightly_recipe at the same precision "
               "(> 1 means faster than lightly's recipe).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--model", help="timm model name (default per device, see below)")
    p.add_argument("--model-kwargs", type=json.loads, default={},
                   help='extra timm.create_model kwargs as JSON, e.g. \'{"depth": 6}\'')
    p.add_argument("--patch-size", type=int, help="override the ViT patch size")
    p.add_argument("--image-size", type=int, help="image side in px (divisible by --mask-patch-size)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--precision", choices=("fp32", "bf16"),
                   help="precision of ours/ours_compiled/timm_plain (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--mask-patch-size", type=int, default=32, help="our mask block side in px (default 32)")
    p.add_argument("--mask-ratio", type=float, default=0.6, help="our mask ratio (default 0.6)")
    p.add_argument("--lightly-mask-ratio", type=float, default=0.75, help="lightly's token mask ratio")
    p.add_argument("--configs", help=f"comma-separated subset of {','.join(ALL_CONFIGS)}")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="include ours_compiled (default: on with CUDA, off on CPU)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--warmup", type=int, help="untimed steps after building each config")
    p.add_argument("--iters", type=int, help="timed steps per config per round")
    p.add_argument("--rounds", type=int, help="interleaved rounds; the median is reported (default 3 on CUDA, 15 on CPU)")
    p.add_argument("--round-warmup", type=int,
                   help="untimed steps before each timed round (default 1 on CUDA, 0 on CPU)")
    p.add_argument("--default-malloc", action="store_true",
                   help="CPU: keep glibc's adaptive malloc instead of the fixed settings (see CPU_MALLOC_ENV)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--find-max-batch", metavar="MODELS",
                   help="comma-separated timm models (e.g. vit_base_patch16_224,vit_large_patch16_224): the "
                        "largest batch of `ours` (--configs: first one) that fits, doubling from --batch-size "
                        "then bisecting to within --max-batch-tolerance")
    p.add_argument("--max-batch-tolerance", type=float, default=0.1,
                   help="stop bisecting when (fails - fits) <= this fraction of fits (default 0.1)")
    p.add_argument("--loss-check-steps", type=int,
                   help="vit suite: steps of the eager-vs-compiled loss check (default 5 on CUDA, 0 = off on CPU)")
    p.add_argument("--suite", choices=("vit", "convnets", "swin", "embed"), default="vit",
                   help="convnets: for resnet50 and convnext_tiny (CUDA; 224 px, batch 128) or two small, narrow "
                        "ones (CPU; 96 px, batch 32): ours (re-masking), ours_mask_token_only and timm_plain, "
                        "with ratio_to_timm_plain")
    p.add_argument("--out", help="also write the JSON result to this file")
    p.add_argument("--worker-spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_spec(args: argparse.Namespace, device: torch.device) -> Spec:
    """Fill device-dependent defaults into a Spec (config left empty)."""
    cuda = device.type == "cuda"
    return Spec(
        config="", device=str(device),
        model=args.model or ("vit_base_patch16_224" if cuda else "vit_tiny_patch16_224"),
        image_size=args.image_size or (224 if cuda else 96),
        batch_size=args.batch_size or (128 if cuda else 32),
        precision=args.precision or ("bf16" if cuda else "fp32"),
        mask_patch_size=args.mask_patch_size, mask_ratio=args.mask_ratio,
        lightly_mask_ratio=args.lightly_mask_ratio, model_kwargs=args.model_kwargs,
        patch_size=args.patch_size,
        warmup=args.warmup if args.warmup is not None else (10 if cuda else 3),
        round_warmup=args.round_warmup if args.round_warmup is not None else int(cuda), seed=args.seed,
    )


def run_convnet_suite(args: argparse.Namespace, device: torch.device) -> None:
    """Per ConvNet: ours with and without re-masking against the plain timm model, interleaved rounds."""
    cuda = device.type == "cuda"
    iters = args.iters or (20 if cuda else 2)
    rounds = args.rounds or (3 if cuda else 7)
    env = {} if cuda or args.default_malloc else CPU_MALLOC_ENV
    t0 = time.perf_counter()
    out: dict[str, Any] = {"benchmark": "train_step_convnets", "summary": {}, "environment": environment(device),
                           "config": {}, "results": {}}
    for model, kwargs in CONVNET_MODELS["cuda" if cuda else "cpu"]:
        base = Spec(**{**asdict(build_spec(args, device)), "model": model, "model_kwargs": kwargs,
                       "image_size": args.image_size or (224 if cuda else 96)})
        results = measure_without_lightly(base, CONVNET_CONFIGS, env, rounds, iters)
        for row in results.values():
            row["ratio_to_timm_plain"] = row["img_per_s"] / results["timm_plain"]["img_per_s"]
        out["results"][model] = results
        out["summary"][model] = {n: {"img_per_s": round(r["img_per_s"], 1), "ms_per_step": round(r["ms_per_step"], 1),
                                     "ratio_to_timm_plain": round(r["ratio_to_timm_plain"], 3),
                                     "peak_memory_mib": round(r["peak_memory_mib"])} for n, r in results.items()}
        out["config"][model] = {**{k: v for k, v in asdict(base).items() if k != "config"},
                                "iters_per_round": iters, "rounds": rounds, "configs": list(CONVNET_CONFIGS),
                                "worker_env": env}
    out["config"]["statistic"] = "median over rounds of the mean step time within a round"
    out["config"]["data"] = "random normal images, already on the device; 32 px mask blocks at 0.6"
    out["wall_seconds"] = time.perf_counter() - t0
    emit(out, args.out)


def measure_without_lightly(base: Spec, configs: tuple[str, ...], env: dict[str, str], rounds: int,
                            iters: int) -> dict[str, dict[str, Any]]:
    """Start one worker per config of ``base``, run interleaved rounds, summarise.

    For suites without lightly's recipe: the rows carry no ratio to it.
    """
    workers: dict[str, Worker] = {}
    memory: dict[str, dict[str, Any]] = {}
    try:
        for name in configs:
            log(f"{base.model}: starting {name} (build + {base.warmup} warmup steps)")
            workers[name] = Worker(Spec(**{**asdict(base), "config": name}), env)
        wall, cpu = run_rounds(workers, rounds, iters)
        for name, w in workers.items():
            memory[name] = w.quit()["memory"]
    finally:
        for w in workers.values():
            if w.proc.poll() is None:
                w.proc.kill()
    results = summarise(wall, cpu, workers, memory, base.batch_size)
    for row in results.values():
        for key in ("reference", "ratio_to_lightly", "ratio_to_lightly_best_round"):
            row.pop(key, None)
    return results


def run_simple_suite(args: argparse.Namespace, device: torch.device, base: Spec, configs: tuple[str, ...],
                     name: str, note: str) -> None:
    """One model, a few configs, interleaved rounds (swin and embed suites)."""
    cuda = device.type == "cuda"
    iters = args.iters or (20 if cuda else 2)
    rounds = args.rounds or (3 if cuda else 5)
    env = {} if cuda or args.default_malloc else CPU_MALLOC_ENV
    if args.configs:
        configs = tuple(args.configs.split(","))
    t0 = time.perf_counter()
    results = measure_without_lightly(base, configs, env, rounds, iters)
    out = {"benchmark": name,
           "summary": {n: {"img_per_s": round(r["img_per_s"], 1), "ms_per_step": round(r["ms_per_step"], 1),
                           "peak_memory_mib": round(r["peak_memory_mib"])} for n, r in results.items()},
           "environment": environment(device),
           "config": {**{k: v for k, v in asdict(base).items() if k != "config"}, "iters_per_round": iters,
                      "rounds": rounds, "configs": list(configs), "worker_env": env, "data": note,
                      "statistic": "median over rounds of the mean step time within a round"},
           "results": results, "wall_seconds": time.perf_counter() - t0}
    emit(out, args.out)


def _fits(spec: Spec) -> bool:
    """Whether ``spec`` builds and runs its warmup steps in a fresh process (False on any failure:
    an out-of-memory error, usually)."""
    try:
        worker = Worker(spec, {})
    except RuntimeError:
        return False
    worker.quit()
    return True


def find_max_batch(args: argparse.Namespace, device: torch.device) -> None:
    """Per model: the largest batch that fits, doubling from --batch-size then bisecting."""
    t0 = time.perf_counter()
    config = args.configs.split(",")[0] if args.configs else "ours"
    out: dict[str, Any] = {"benchmark": "train_step_max_batch", "environment": environment(device),
                           "config": {"config": config, "tolerance": args.max_batch_tolerance,
                                      "warmup_steps_per_try": 2}, "results": {}}
    for model in args.find_max_batch.split(","):
        base = Spec(**{**asdict(build_spec(args, device)), "model": model, "config": config, "warmup": 2,
                       "image_size": args.image_size or (224 if device.type == "cuda" else 96)})
        tries: dict[int, bool] = {}

        def probe(batch: int, base: Spec = base, tries: dict[int, bool] = tries) -> bool:
            ok = _fits(Spec(**{**asdict(base), "batch_size": batch}))
            tries[batch] = ok
            log(f"{base.model} batch {batch}: {'fits' if ok else 'does not fit'}")
            return ok

        lo, hi = 0, base.batch_size
        while probe(hi):
            lo, hi = hi, hi * 2
        while lo > 0 and hi - lo > max(1, int(lo * args.max_batch_tolerance)):
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if probe(mid) else (lo, mid)
        out["results"][model] = {"largest_batch_that_fits": lo or None, "smallest_that_failed": hi,
                                 "tries": {str(k): v for k, v in sorted(tries.items())},
                                 "image_size": base.image_size, "precision": base.precision}
    out["wall_seconds"] = time.perf_counter() - t0
    emit(out, args.out)


def loss_check(base: Spec, device: torch.device, steps: int) -> dict[str, Any]:
    """Eager vs compiled ``ours`` from the same weights, on the same images and masks: the losses
    of ``steps`` training steps each, and their largest absolute difference."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(base.seed)
    cfg = _model_config(base)
    eager_model = build_model(cfg).to(device)
    compiled_model = build_model(cfg).to(device)
    compiled_model.load_state_dict(eager_model.state_dict())
    gen = build_mask_generator(cfg, eager_model.encoder)
    rng = np.random.default_rng(base.seed)
    g = torch.Generator().manual_seed(base.seed)
    data = [(torch.randn(base.batch_size, 3, base.image_size, base.image_size, generator=g).to(device),
             torch.from_numpy(np.stack([gen(rng) for _ in range(base.batch_size)])).to(device))
            for _ in range(steps)]
    losses: dict[str, list[float]] = {}
    for name, model, fn in (("eager", eager_model, eager_model), ("compiled", compiled_model,
                                                                   torch.compile(compiled_model))):
        opt = _adamw(model.param_groups(0.05), device)
        values = []
        for images, masks in data:
            with _autocast(device, base.precision):
                loss, _ = fn(images, masks)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            values.append(loss.detach())
        losses[name] = [float(v) for v in torch.stack(values).cpu()]
    diff = max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"], strict=True))
    return {"steps": steps, "precision": base.precision, "eager": losses["eager"], "compiled": losses["compiled"],
            "max_abs_diff": diff, "max_rel_diff": diff / max(abs(v) for v in losses["eager"])}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker_spec:
        worker_main(Spec(**json.loads(args.worker_spec)))
        return
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if args.find_max_batch:
        find_max_batch(args, device)
        return
    if args.suite == "convnets":
        run_convnet_suite(args, device)
        return
    if args.suite == "swin":
        model, size = SWIN_MODELS["cuda" if cuda else "cpu"]
        base = Spec(**{**asdict(build_spec(args, device)), "model": args.model or model,
                       "image_size": args.image_size or size})
        configs = SWIN_CONFIGS if cuda or args.compile else tuple(c for c in SWIN_CONFIGS if "compiled" not in c)
        run_simple_suite(args, device, base, configs, "train_step_swin",
                         "random normal images on the device; window = image_size // 32")
        return
    if args.suite == "embed":
        base = Spec(**{**asdict(build_spec(args, device)), "batch_size": args.batch_size or (256 if cuda else 64)})
        configs = EMBED_CONFIGS if cuda or args.compile else ("embed_eager",)
        run_simple_suite(args, device, base, configs, "embed_speed",
                         "inference only (torch.inference_mode), mean-pooled embeddings, random images on the device")
        return
    base = build_spec(args, device)
    iters = args.iters or (20 if device.type == "cuda" else 2)
    configs = args.configs.split(",") if args.configs else default_configs(device, args.compile, base.precision)
    unknown = sorted(set(configs) - set(ALL_CONFIGS))
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {ALL_CONFIGS}")
    rounds = args.rounds or (3 if device.type == "cuda" else 15)
    env = {} if device.type == "cuda" or args.default_malloc else CPU_MALLOC_ENV
    t0 = time.perf_counter()
    workers: dict[str, Worker] = {}
    memory: dict[str, dict[str, Any]] = {}
    try:
        for name in configs:
            log(f"starting {name} (build + {base.warmup} warmup steps)")
            workers[name] = Worker(Spec(**{**asdict(base), "config": name}), env)
        wall, cpu = run_rounds(workers, rounds, iters)
        for name, w in workers.items():
            memory[name] = w.quit()["memory"]
    finally:
        for w in workers.values():
            if w.proc.poll() is None:
                w.proc.kill()
    results = summarise(wall, cpu, workers, memory, base.batch_size)
    result = {
        "benchmark": "train_step",
        "summary": headline(results),
        "environment": environment(device),
        "config": {**{k: v for k, v in asdict(base).items() if k != "config"}, "iters_per_round": iters,
                   "rounds": rounds, "configs": configs, "worker_env": env,
                   "statistic": "median over rounds of the mean step time within a round",
                   "data": "random normal images, already on the device"},
        "results": results,
    }
    steps = args.loss_check_steps if args.loss_check_steps is not None else (5 if cuda else 0)
    if steps > 0:
        log(f"loss check: eager vs compiled, {steps} steps")
        result["loss_check"] = loss_check(base, device, steps)
    result["wall_seconds"] = time.perf_counter() - t0
    emit(result, args.out)


if __name__ == "__main__":
    main()
