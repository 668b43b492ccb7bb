"""Training configuration: one validated pydantic model, loadable from YAML with overrides.

Defaults follow microsoft/SimMIM (`config.py` and the `simmim_pretrain__*` configs):
32 px mask blocks at ratio 0.6, AdamW (0.9, 0.999) with weight decay 0.05, learning rates
given for a total batch of 512 and scaled linearly, warmup then cosine, grad clip 5.0.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from simmim.data.archives import DEFAULT_MAX_MEMBER_BYTES
from simmim.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONVNET_REMASK_DEFAULT = False  # re-masking did not measurably help on the digits probe (bench/README.md)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataConfig(_Section):
    """Where the unlabelled images come from and how they are loaded."""

    source: str = Field(
        description="A folder (searched recursively), a .txt file listing image paths, "
        "or a .tar/.tar.gz/.zip archive of images.",
    )
    num_workers: int | None = Field(
        default=None, ge=0, le=64, description="DataLoader worker processes; default min(8, CPUs)."
    )
    min_image_size: int = Field(
        default=16, ge=1, description="Images with a side shorter than this are reported as tiny."
    )
    decode: Literal["auto", "cpu", "gpu"] = Field(
        default="auto",
        description="Where training images are decoded and augmented. cpu: DataLoader workers decode "
        "(PIL) and crop/flip/normalise. gpu: workers only read file bytes and draw the crop box, flip "
        "and mask; the training process decodes JPEGs in batches on the training device "
        "(torchvision.io.decode_jpeg) and crops/resizes/flips/normalises there (non-JPEG files and "
        "EXIF-rotated or CMYK JPEGs are still decoded by the workers). auto: gpu on CUDA, cpu otherwise.",
    )
    persistent_workers: bool = Field(
        default=True,
        description="Keep DataLoader workers alive across epochs (the epoch travels with each sampled "
        "index, so every sample stays a pure function of (seed, epoch, index)).",
    )
    max_member_bytes: int = Field(
        default=DEFAULT_MAX_MEMBER_BYTES, ge=1,
        description="Largest decompressed archive member read; larger ones are skipped (zip bombs).",
    )
    allowed_roots: list[str] = Field(
        default_factory=list,
        description="Folders every image of a .txt list must lie in, symlinks and '..' resolved "
        "(a service's allowed dataset roots). Empty: anywhere.",
    )


class ModelConfig(_Section):
    """The timm encoder and the SimMIM masking applied to it."""

    name: str = Field(default="vit_base_patch16_224", description="A timm model name.")
    image_size: int = Field(default=224, ge=16, le=4096)
    patch_size: int | None = Field(
        default=None, ge=1, le=64, description="ViT patch size; default is the timm model's own."
    )
    window_size: int | None = Field(
        default=None, ge=1, description="Swin window; default image_size // 32 (192 -> 6, 224 -> 7)."
    )
    mask_patch_size: int = Field(default=32, ge=1, description="Side of a masked block in pixels.")
    mask_ratio: float = Field(default=0.6, gt=0.0, lt=1.0)
    pos_embed: Literal["sincos", "learned"] = Field(
        default="sincos",
        description="ViT absolute position table: fixed 2-D sin-cos (MAE-style) or learned.",
    )
    drop_path_rate: float = Field(default=0.0, ge=0.0, lt=1.0)
    init_checkpoint: str | None = Field(
        default=None, description="Optional local file (.safetensors or .pt) to initialise the encoder."
    )
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for timm.create_model."
    )
    convnet_remask: bool = Field(
        default=CONVNET_REMASK_DEFAULT,
        description="ConvNets (resnet*, resnetv2_*, convnext_*): re-apply the mask after every stage "
        "but the last, with BatchNorm/GroupNorm statistics from visible positions only. "
        "Ignored by transformers.",
    )

    @model_serializer(mode="wrap")
    def _omit_default_remask(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Checkpoints written before this field existed must still resume: the engine compares
        # stored and current model sections, so the field is stored only when it is not the default.
        data: dict[str, Any] = handler(self)
        if data.get("convnet_remask") == CONVNET_REMASK_DEFAULT:
            data.pop("convnet_remask")
        return data


class OptimConfig(_Section):
    """AdamW and the learning-rate schedule (rates are per total batch of 512)."""

    batch_size: int = Field(default=128, ge=1, le=65536, description="Images per process per micro-step.")
    accumulation_steps: int = Field(default=1, ge=1, le=1024)
    base_lr: float = Field(default=1e-4, gt=0.0, le=1.0)
    warmup_lr: float = Field(default=5e-7, ge=0.0, le=1.0)
    min_lr: float = Field(default=5e-6, ge=0.0, le=1.0)
    weight_decay: float = Field(default=0.05, ge=0.0, le=10.0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(default=5.0, gt=0.0)
    epochs: int | None = Field(default=100, ge=1, le=100000)
    max_steps: int | None = Field(
        default=None, ge=1, description="Optimiser steps; overrides epochs when set."
    )
    warmup_epochs: float = Field(default=10.0, ge=0.0)
    warmup_steps: int | None = Field(default=None, ge=0, description="Overrides warmup_epochs.")

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must each be in [0, 1), got {self.betas}")
        if self.min_lr > self.base_lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed base_lr ({self.base_lr})")
        return self


class RunConfig(_Section):
    """Where outputs go and how the run executes."""

    output_dir: str = "runs/simmim"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto: bf16 autocast on CUDA, fp32 on CPU."
    )
    compile: bool | Literal["auto"] = Field(
        default="auto", description="torch.compile the model; auto: on CUDA, off on CPU."
    )
    tf32: bool = Field(
        default=True,
        description="CUDA: allow TF32 for fp32 matmuls and convolutions (bf16 autocast covers most of "
        "the step; this speeds up what runs in fp32).",
    )
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N.")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    checkpoint_every: int = Field(default=1000, ge=1, description="Steps between checkpoints.")
    keep_last: int = Field(default=3, ge=1, le=1000, description="Checkpoints kept besides the final.")
    log_every: int = Field(
        default=10, ge=1,
        description="Steps between progress reports. The loss stays on the device in between: it is "
        "read, and checked for NaN/inf, only every log_every steps and before every checkpoint.",
    )
    log_interval_s: float | None = Field(
        default=None, gt=0,
        description="Also report when this many seconds have passed since the last report, so a long "
        "log_every still gives timely progress (a service sets it and a huge log_every). Under DDP "
        "the ranks agree on it with a per-step all-reduce of two flags (the one a should_stop "
        "callback already costs).",
    )
    preview_images: int = Field(
        default=8, ge=0, le=64,
        description="Images in the reconstruction preview written at every checkpoint "
        "(output_dir/previews/step_XXXXXXXX.png); 0 disables previews.",
    )
    tensorboard: bool = Field(
        default=True,
        description="Also write the logged scalars as TensorBoard events under output_dir/tensorboard "
        "(skipped with a warning when the tensorboard package is not installed).",
    )


class TrainConfig(_Section):
    """Everything one SimMIM pretraining run needs."""

    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _check_length(self) -> TrainConfig:
        # Mask geometry is checked against the encoder's patch size by simmim.masking.
        if self.optim.epochs is None and self.optim.max_steps is None:
            raise ValueError("set optim.epochs or optim.max_steps")
        return self

    @property
    def experiment_name(self) -> str:
        """A name that says what the run is, as microsoft/SimMIM names its configs."""
        length = f"{self.optim.max_steps}steps" if self.optim.max_steps else f"{self.optim.epochs}ep"
        return f"simmim_pretrain__{self.model.name}__img{self.model.image_size}__{length}"


def scaled_lr(lr: float, total_batch: int) -> float:
    """Linear LR scaling rule used by SimMIM: rates are quoted for a total batch of 512."""
    return lr * total_batch / 512


def format_validation_error(err: ValidationError) -> list[str]:
    """One human line per problem, e.g. ``optim.batch_size: must be >= 1 (got 0)``."""
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        if e["type"] not in ("missing", "value_error", "model_type") and not isinstance(got, dict):
            msg = f"{msg} (got {got!r})"
        lines.append(f"{where}: {msg}")
    return lines


def parse_config(raw: dict[str, Any]) -> TrainConfig:
    """Validate a raw mapping; raises ConfigError listing every problem."""
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides; values are parsed as YAML scalars/lists."""
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected key=value, e.g. optim.batch_size=64")
            continue
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"--set {item!r}: {part} is not a section")
                break
            node = child
        else:
            node[parts[-1]] = yaml.safe_load(value) if value != "" else None
    if problems:
        raise ConfigError(problems)
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a YAML config file (or start empty), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file not found: {p}"])
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ConfigError([f"{p} is not valid YAML: {err}"]) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError([f"{p} must hold a mapping of sections, not {type(loaded).__name__}"])
        raw = loaded or {}
    return parse_config(apply_overrides(raw, overrides or []))


def steps_per_epoch(num_images: int, batch_size: int, world_size: int, accumulation: int) -> int:
    """Optimiser steps in one pass over the data (incomplete batches are dropped)."""
    return num_images // (batch_size * world_size * accumulation)


def total_steps(cfg: OptimConfig, per_epoch: int) -> int:
    """Optimiser steps the run will take."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    assert cfg.epochs is not None
    return cfg.epochs * per_epoch


def warmup_steps(cfg: OptimConfig, per_epoch: int, total: int) -> int:
    """Warmup length in optimiser steps, never longer than the run."""
    steps = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_epochs * per_epoch)
    return min(steps, total)
