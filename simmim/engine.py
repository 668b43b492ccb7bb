"""The one SimMIM training path: data, AdamW, schedule, accumulation, checkpoints, progress.

The loss stays on the device between reports: a step never waits for the GPU. Losses are
read (one host sync), averaged across DDP ranks and checked for NaN/inf at each report (every
``run.log_every`` steps, and every ``run.log_interval_s`` seconds when set) and before every
checkpoint, so a checkpoint never holds weights from a non-finite step.

Every sample is a pure function of (seed, epoch, index) and the sampler's order of
(seed, epoch), so resuming at step ``s`` only needs the weights, the optimiser state, the
RNG states and ``s``: an interrupted-and-resumed run reproduces the uninterrupted one.

The main process also writes ``metrics.jsonl`` (and TensorBoard events under ``tensorboard/``
when ``run.tensorboard``) and, at every checkpoint, a reconstruction preview
``previews/step_XXXXXXXX.png`` of ``run.preview_images`` fixed images (:mod:`simmim.preview`);
neither touches the training RNG streams.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from simmim.checkpoint import CheckpointInfo, CheckpointManager, rng_state, set_rng_state
from simmim.config import TrainConfig, scaled_lr, total_steps, warmup_steps
from simmim.errors import CheckpointError, NonFiniteLossError
from simmim.export import export_encoder
from simmim.masking import MaskGenerator
from simmim.metrics_log import MetricsLog, TensorBoardLog, open_tensorboard
from simmim.model import build_mask_generator, build_model
from simmim.preview import PREVIEW_DIR, PreviewBatch, preview_batch, write_preview
from simmim.runtime import Runtime, setup_runtime, teardown_runtime
from simmim.schedule import get_lr
from simmim.train_data import TrainData, build_train_data

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """One progress report; ``data_wait_fraction`` is the share of time spent waiting for data."""

    step: int
    total_steps: int
    epoch: int
    loss: float
    lr: float
    images_per_sec: float
    data_wait_fraction: float
    eta_seconds: float
    skipped_images: int


@dataclass(frozen=True)
class TrainResult:
    """What a finished (or stopped) run produced."""

    steps: int
    total_steps: int
    final_loss: float | None
    checkpoint: CheckpointInfo | None
    encoder_dir: Path | None
    skipped_images: int
    stopped: bool
    resumed_from: int | None


ProgressCallback = Callable[[Progress], None]
CheckpointCallback = Callable[[CheckpointInfo], None]


def train(
    cfg: TrainConfig,
    *,
    on_progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: bool = True,
    on_checkpoint: CheckpointCallback | None = None,
) -> TrainResult:
    """Run SimMIM pretraining as described by ``cfg``.

    Args:
        cfg: The validated configuration.
        on_progress: Called on the main process every ``run.log_every`` steps (and every
            ``run.log_interval_s`` seconds when set) and at the end.
        should_stop: Polled every step; when it returns True the run checkpoints and returns.
        resume: Continue from the newest valid checkpoint in ``run.output_dir`` if any.
        on_checkpoint: Called on the main process right after each checkpoint is saved
            (periodic, on stop and final), e.g. to record or upload it.
    """
    rt = setup_runtime(cfg.run.device, cfg.run.precision)
    trainer: _Trainer | None = None
    try:
        trainer = _Trainer(cfg, rt, on_progress, should_stop, on_checkpoint)
        return trainer.run(resume)
    finally:
        if trainer is not None:
            trainer.data.close()
        teardown_runtime(rt)


def compile_enabled(cfg: TrainConfig, device: torch.device) -> bool:
    """``run.compile``: true/false as given; auto = on for CUDA, off elsewhere."""
    if cfg.run.compile == "auto":
        return device.type == "cuda"
    return bool(cfg.run.compile)


def configure_backends(cfg: TrainConfig, device: torch.device) -> None:
    """CUDA math settings of the run: TF32 for fp32 matmuls/convolutions, cuDNN autotuning."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = cfg.run.tf32
    torch.backends.cudnn.allow_tf32 = cfg.run.tf32
    torch.backends.cudnn.benchmark = True  # fixed shapes every step


class _Trainer:
    def __init__(self, cfg: TrainConfig, rt: Runtime, on_progress: ProgressCallback | None,
                 should_stop: Callable[[], bool] | None,
                 on_checkpoint: CheckpointCallback | None = None) -> None:
        self.cfg, self.rt = cfg, rt
        self.on_progress, self.should_stop = on_progress, should_stop
        self.on_checkpoint = on_checkpoint
        torch.manual_seed(cfg.run.seed)
        configure_backends(cfg, rt.device)
        self.out = Path(cfg.run.output_dir)
        self.model = build_model(cfg.model).to(rt.device)
        mask_gen = build_mask_generator(cfg.model, self.model.encoder)
        self.data: TrainData = build_train_data(cfg, mask_gen, rt)
        o = cfg.optim
        self.total = total_steps(o, self.data.steps_per_epoch)
        self.warmup = warmup_steps(o, self.data.steps_per_epoch, self.total)
        batch = o.batch_size * o.accumulation_steps * rt.world_size
        self.lrs = {"base_lr": scaled_lr(o.base_lr, batch), "warmup_lr": scaled_lr(o.warmup_lr, batch),
                    "min_lr": scaled_lr(o.min_lr, batch)}
        self.images_per_step = batch
        self.optimizer = torch.optim.AdamW(
            self.model.param_groups(o.weight_decay), lr=self.lrs["base_lr"], betas=o.betas,
            fused=rt.device.type == "cuda",
        )
        self.ckpts = CheckpointManager(self.out / "checkpoints", keep_last=cfg.run.keep_last)
        self.metrics = MetricsLog(self.out / "metrics.jsonl") if rt.is_main else None
        self.tensorboard: TensorBoardLog | None = None  # opened by run(), once the resume step is known
        self.preview = self._preview_batch(mask_gen) if rt.is_main else None
        self.step_fn = self._wrap_model()
        self.step = 0
        self.skipped = 0
        self.resumed: CheckpointInfo | None = None
        # (step, loss on the device) of the steps taken since the losses were last read
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.reported_at = time.monotonic()  # for run.log_interval_s

    def _wrap_model(self) -> nn.Module:
        module: nn.Module = self.model
        self.ddp: DistributedDataParallel | None = None
        if self.rt.distributed:
            ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            module = self.ddp = DistributedDataParallel(module, device_ids=ids)
        if compile_enabled(self.cfg, self.rt.device):
            module = torch.compile(module)  # type: ignore[assignment]
        return module

    def run(self, resume: bool) -> TrainResult:
        resumed_from = self._resume() if resume else None
        if self.rt.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(self.cfg.model_dump_json(indent=2))
            if self.cfg.run.tensorboard:
                self.tensorboard = open_tensorboard(self.out / "tensorboard", self.step)
        try:
            return self._run(resumed_from)
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()

    def _run(self, resumed_from: int | None) -> TrainResult:
        loss, stopped, last_ckpt = self._loop()
        last_ckpt = last_ckpt or self.resumed
        if stopped or self.step < self.total:
            last_ckpt = self._checkpoint(final=False)
            return self._result(loss, last_ckpt, None, stopped=True, resumed_from=resumed_from)
        if last_ckpt is None or last_ckpt.step != self.step or not last_ckpt.final:
            last_ckpt = self._checkpoint(final=True)
        encoder_dir = None
        if self.rt.is_main:
            encoder_dir = export_encoder(self.model, self.cfg, self.out / "encoder")
        return self._result(loss, last_ckpt, encoder_dir, stopped=False, resumed_from=resumed_from)

    def _result(self, loss: float | None, ckpt: CheckpointInfo | None, encoder_dir: Path | None,
                *, stopped: bool, resumed_from: int | None) -> TrainResult:
        return TrainResult(self.step, self.total, loss, ckpt, encoder_dir, self.skipped, stopped, resumed_from)

    def _loop(self) -> tuple[float | None, bool, CheckpointInfo | None]:
        accum = self.cfg.optim.accumulation_steps
        meter = _Meter(self.step, self.images_per_step)
        loss_value: float | None = None
        last_ckpt = None
        while self.step < self.total:
            epoch, batch_in_epoch = divmod(self.step, self.data.steps_per_epoch)
            batches = self.data.epoch_batches(epoch, start_batch=batch_in_epoch * accum)
            while self.step < self.total:
                t0 = time.perf_counter()
                micro = _take(batches, accum)
                if micro is None:
                    break  # epoch exhausted
                meter.add_wait(time.perf_counter() - t0)
                self.pending.append((self.step, self._optimizer_step(micro)))
                self.step += 1
                meter.end_step()
                stop, report_now = self._agree(self._report_interval_elapsed())
                if report_now or self.step % self.cfg.run.log_every == 0 or self.step == self.total:
                    loss_value = self._read_losses()
                    assert loss_value is not None
                    self._report(meter, epoch, loss_value)
                if self.step % self.cfg.run.checkpoint_every == 0 and self.step < self.total:
                    last_ckpt = self._checkpoint(final=False)
                if stop:
                    return _newest(self._read_losses(), loss_value), True, last_ckpt
        return _newest(self._read_losses(), loss_value), False, last_ckpt

    def _read_losses(self) -> float | None:
        """Read the losses of the steps since the last read; the newest one, None if none.

        One host sync for all of them (and, under DDP, one all-reduce of all of them, so every
        rank must call this at the same steps: it does, at log steps, checkpoints and stops).

        Raises:
            NonFiniteLossError: Naming the first step whose loss was NaN or inf. The weights in
                memory may be non-finite by then; no checkpoint is written after this.
        """
        if not self.pending:
            return None
        steps = [s for s, _ in self.pending]
        losses = torch.stack([v for _, v in self.pending])
        self.pending = []
        values = _mean_across(losses, self.rt).tolist()
        for step, value in zip(steps, values, strict=True):
            if not math.isfinite(value):
                log.error("non-finite loss at step %d (steps %d-%d were read together); no checkpoint "
                          "holds weights from step %d on", step, steps[0], steps[-1], step)
                raise NonFiniteLossError(step, value)
        return float(values[-1])

    def _report_interval_elapsed(self) -> bool:
        interval = self.cfg.run.log_interval_s
        return interval is not None and time.monotonic() - self.reported_at >= interval

    def _agree(self, report_now: bool) -> tuple[bool, bool]:
        """(stop now, report now); under DDP each is True on every rank as soon as any rank says so.

        Ranks may see a stop signal (a shared event, SIGTERM) or a report interval end at
        different steps; acting on one rank only would leave the others waiting in the next
        all-reduce forever. ``should_stop`` must be given on every rank or on none. Without a
        ``should_stop`` and a ``log_interval_s`` nothing needs agreeing: no all-reduce.
        """
        stop = self.should_stop is not None and bool(self.should_stop())
        if not self.rt.distributed or (self.should_stop is None and self.cfg.run.log_interval_s is None):
            return stop, report_now
        flags = torch.tensor([float(stop), float(report_now)], device=self.rt.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        agreed = flags.tolist()
        return agreed[0] > 0, agreed[1] > 0

    def _optimizer_step(self, micro: list[dict[str, Any]]) -> torch.Tensor:
        """One optimiser step; returns this rank's mean loss as a 0-d tensor on the device
        (no host sync: nothing here reads a value back)."""
        lr = get_lr(self.step, total=self.total, warmup=self.warmup, **self.lrs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total_loss = torch.zeros((), device=self.rt.device)
        for i, batch in enumerate(micro):
            self.skipped += int(batch["skipped"])
            images = batch["image"].to(self.rt.device, non_blocking=True)
            mask = batch["mask"].to(self.rt.device, non_blocking=True)
            last = i == len(micro) - 1
            # DDP all-reduces gradients only on the last micro-batch of an optimiser step.
            with self.ddp.no_sync() if self.ddp is not None and not last else nullcontext():
                with self.rt.autocast():
                    loss, _ = self.step_fn(images, mask)
                (loss / len(micro)).backward()
            total_loss += loss.detach().float() / len(micro)
        if self.cfg.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total_loss

    def _report(self, meter: _Meter, epoch: int, loss: float) -> None:
        self.reported_at = time.monotonic()
        if not self.rt.is_main:
            return
        lr = self.optimizer.param_groups[0]["lr"]
        ips, wait = meter.window()
        eta = (self.total - self.step) * self.images_per_step / ips if ips > 0 else float("nan")
        progress = Progress(self.step, self.total, epoch, loss, lr, ips, wait, eta, self.skipped)
        scalars = {"loss": loss, "lr": lr, "images_per_sec": ips, "data_wait_fraction": wait}
        if self.metrics is not None:
            self.metrics.write(self.step, **scalars)
        if self.tensorboard is not None:
            self.tensorboard.write(self.step, **scalars)
        if self.on_progress is not None:
            self.on_progress(progress)

    def _state(self) -> dict[str, Any]:
        return {
            "format_version": 1,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(),
            "skipped_images": self.skipped,
            "config": self.cfg.model_dump(mode="json"),
        }

    def _checkpoint(self, final: bool) -> CheckpointInfo | None:
        self._read_losses()  # raises before saving weights from a non-finite step
        info = self.ckpts.save(self._state(), self.step, final=final) if self.rt.is_main else None
        if self.rt.is_main:
            self._write_preview()
            if self.tensorboard is not None:
                self.tensorboard.flush()
        if self.rt.distributed:
            torch.distributed.barrier()
        if info is not None and self.on_checkpoint is not None:
            self.on_checkpoint(info)
        return info

    def _preview_batch(self, mask_gen: MaskGenerator) -> PreviewBatch | None:
        """The fixed images and masks of this run's previews (None when previews are off)."""
        count = self.cfg.run.preview_images
        if count == 0:
            return None
        augment = self.data.dataset.augment
        try:
            return preview_batch(self.data.dataset.source, self.cfg.model.image_size, mask_gen, count,
                                 self.cfg.run.seed, augment.mean, augment.std)
        except Exception as err:  # a preview must never stop training
            log.warning("reconstruction previews are off for this run: %s", err)
            return None

    def _write_preview(self) -> None:
        """``previews/step_XXXXXXXX.png`` of the live model (RNG states and train mode untouched)."""
        if self.preview is None:
            return
        try:
            write_preview(self.model, self.preview, self.out / PREVIEW_DIR, self.step, self.rt.device)
        except Exception as err:  # a preview must never stop training
            log.warning("could not write the reconstruction preview at step %d: %s", self.step, err,
                        exc_info=True)

    def _resume(self) -> int | None:
        info = self.ckpts.latest_valid()
        if info is None:
            return None
        state = self.ckpts.load(info)
        if state["config"]["model"] != self.cfg.model.model_dump(mode="json"):
            raise CheckpointError(
                f"{info.path} was trained with a different model config; use a new run.output_dir "
                "or pass --no-resume to start over"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.skipped = int(state.get("skipped_images", 0))
        self.resumed = info
        log.info("resumed from %s at step %d", info.path, self.step)
        return self.step


class _Meter:
    """Throughput and data-wait over the steps since the last report."""

    def __init__(self, step: int, images_per_step: int) -> None:
        self.images_per_step = images_per_step
        self.start = time.perf_counter()
        self.wait = 0.0
        self.steps = 0

    def add_wait(self, seconds: float) -> None:
        self.wait += seconds

    def end_step(self) -> None:
        self.steps += 1

    def window(self) -> tuple[float, float]:
        """(images/s, data-wait fraction) since the last call; starts a new window."""
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        result = (self.steps * self.images_per_step / elapsed, min(1.0, self.wait / elapsed))
        self.start, self.wait, self.steps = now, 0.0, 0
        return result


def _take(batches: Iterator[dict[str, Any]], n: int) -> list[dict[str, Any]] | None:
    out = []
    for _ in range(n):
        batch = next(batches, None)
        if batch is None:
            return None
        out.append(batch)
    return out


def _newest(read: float | None, previous: float | None) -> float | None:
    return read if read is not None else previous


def _mean_across(values: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """The mean over ranks of ``values`` (any shape), on the CPU."""
    if rt.distributed:
        values = values.clone()
        torch.distributed.all_reduce(values)
        values /= rt.world_size
    return values.cpu()


def progress_dict(p: Progress) -> dict[str, Any]:
    """A JSON-ready view of a progress report."""
    return asdict(p)
