"""The job spec users POST, and every check that runs before a job is queued.

The checks need no torch: model facts come from the model catalog, sizes and ranges from
the same pydantic config the library trains with (``simmim.config.TrainConfig``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationError

from simmim.config import CONVNET_REMASK_DEFAULT, TrainConfig, format_validation_error
from simmim.data.sources import LIST_SUFFIXES, ListFileSource
from simmim.errors import DataError
from simmim.masking import check_mask_geometry
from simmim_service import model_catalog
from simmim_service.addresses import AddressRefused, checked_addresses
from simmim_service.settings import Settings

REMOTE_SCHEMES = ("http://", "https://", "s3://")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")


class TrainingSpec(BaseModel):
    """How to pretrain; defaults follow the SimMIM paper for ViT-B/16 at 224 px."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(default="vit_base_patch16_224",
                       description="A timm ViT, DeiT, EVA, Swin, ResNet (resnet*, resnetv2_*) or ConvNeXt name")
    image_size: int = Field(default=224, ge=16, le=4096)
    patch_size: int | None = Field(default=None, ge=1, le=64, description="ViT patch size override")
    mask_patch_size: int = Field(default=32, ge=1, le=1024)
    mask_ratio: float = Field(default=0.6, gt=0.0, lt=1.0)
    epochs: int | None = Field(default=100, ge=1, le=100000)
    max_steps: int | None = Field(default=None, ge=1, description="Overrides epochs")
    batch_size: int = Field(default=128, ge=1, le=65536,
                            description="Per GPU (per process); the total batch is batch_size x accumulation_steps x gpus")
    accumulation_steps: int = Field(default=1, ge=1, le=1024)
    base_lr: float = Field(default=1e-4, gt=0.0, le=1.0, description="Per total batch of 512")
    weight_decay: float = Field(default=0.05, ge=0.0, le=10.0)
    warmup_epochs: float = Field(default=10.0, ge=0.0)
    warmup_steps: int | None = Field(default=None, ge=0)
    gpus: int = Field(default=1, ge=1, le=64,
                      description="Data-parallel processes (DDP) on one worker: GPUs on a GPU worker (NCCL), "
                                  "CPU processes on a CPU-only worker (gloo). The job waits for a worker "
                                  "that owns this many")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool | Literal["auto"] = Field(
        default="auto", description="torch.compile the model; auto: on CUDA, off on CPU")
    tf32: bool = Field(default=True, description="CUDA: TF32 for what runs in fp32 (matmuls, convolutions)")
    decode: Literal["auto", "cpu", "gpu"] = Field(
        default="auto",
        description="Where training JPEGs are decoded and augmented: gpu (nvJPEG + crop/flip/normalise on "
                    "the GPU; loader workers only read bytes), cpu (PIL in loader workers); auto: gpu on CUDA")
    persistent_workers: bool = Field(default=True, description="Keep data loader processes between epochs")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    checkpoint_every: int = Field(default=1000, ge=1, description="Steps between checkpoints")
    keep_last: int = Field(default=3, ge=1, le=100)
    num_workers: int | None = Field(default=None, ge=0, le=64, description="Data loader processes")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra timm.create_model kwargs")
    convnet_remask: bool = Field(
        default=CONVNET_REMASK_DEFAULT,
        description="ConvNets only: re-apply the mask after every stage but the last, with norm statistics "
                    "from visible positions (SparK-style, dense ops)")


class WebhookSpec(BaseModel):
    """Where to POST the job's terminal event (succeeded, failed, cancelled), and the signing key.

    The secret is write-only: stored to sign deliveries, never returned or logged.
    """

    model_config = ConfigDict(extra="forbid")

    url: HttpUrl = Field(description="http:// or https:// URL; the API process sends the POST itself")
    secret: str = Field(min_length=16, max_length=256, repr=False, json_schema_extra={"writeOnly": True},
                        description="Key of the HMAC-SHA256 signature in X-SimMIM-Signature (write-only)")


class JobCreate(BaseModel):
    """``POST /v1/jobs`` body."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{
            "name": "digits-vit-tiny",
            "dataset": "/data/digits/train",
            "training": {"model": "vit_tiny_patch16_224", "image_size": 32, "patch_size": 4,
                         "mask_patch_size": 8, "epochs": 10, "batch_size": 64, "base_lr": 1e-3},
            "metadata": {"team": "vision"},
        }]},
    )

    dataset: str = Field(min_length=1, max_length=2000,
                         description="Local path, file://, http(s):// to a .tar/.zip, or s3:// location")
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    name: str | None = Field(default=None, max_length=200)
    metadata: dict[str, str | int | float | bool] = Field(default_factory=dict, max_length=50)
    webhook: WebhookSpec | None = Field(default=None, description="Signed POST when the job ends")


def train_config(training: TrainingSpec, *, source: str, output_dir: str, device: str = "auto") -> TrainConfig:
    """The library config for a spec (raises pydantic ValidationError when it is invalid)."""
    t = training
    return TrainConfig.model_validate({
        "data": {"source": source, "num_workers": t.num_workers, "decode": t.decode,
                 "persistent_workers": t.persistent_workers},
        "model": {"name": t.model, "image_size": t.image_size, "patch_size": t.patch_size,
                  "mask_patch_size": t.mask_patch_size, "mask_ratio": t.mask_ratio,
                  "model_kwargs": t.model_kwargs, "convnet_remask": t.convnet_remask},
        "optim": {"batch_size": t.batch_size, "accumulation_steps": t.accumulation_steps,
                  "base_lr": t.base_lr, "weight_decay": t.weight_decay, "epochs": t.epochs,
                  "max_steps": t.max_steps, "warmup_epochs": t.warmup_epochs, "warmup_steps": t.warmup_steps},
        "run": {"output_dir": output_dir, "precision": t.precision, "compile": t.compile, "tf32": t.tf32,
                "seed": t.seed,
                "checkpoint_every": t.checkpoint_every, "keep_last": t.keep_last, "device": device},
    })


Problem = dict[str, str]


def check_training(t: TrainingSpec) -> list[Problem]:
    """Model known, sizes that divide, and the library's own range checks."""
    entry = model_catalog.lookup(t.model)
    if entry is None:
        close = model_catalog.suggestions(t.model)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return [{"field": "training.model", "message": f"unknown or unsupported timm model {t.model!r}{hint}"}]
    problems: list[Problem] = []
    convnet = entry["family"] in model_catalog.CONVNET_FAMILIES
    if entry["family"] == "swin" and t.patch_size is not None:
        problems.append({"field": "training.patch_size", "message": "Swin models keep their 4 px patches"})
    if convnet and t.patch_size is not None:
        problems.append({"field": "training.patch_size",
                         "message": f"{t.model} is a ConvNet and has no patch size (stem stride "
                                    f"{entry['patch_size']}, total stride {entry['stride']}); leave it unset"})
    patch = entry["patch_size"] if convnet else t.patch_size or entry["patch_size"]
    feature_stride = entry["stride"] if convnet else None
    for message in check_mask_geometry(t.image_size, t.mask_patch_size, patch, t.mask_ratio, feature_stride):
        field = "training.image_size" if message.startswith("image_size") and convnet else "training.mask_patch_size"
        problems.append({"field": field, "message": message})
    if entry["family"] == "swin" and t.image_size % 32 != 0:
        problems.append({"field": "training.image_size",
                         "message": f"Swin needs image_size divisible by 32, got {t.image_size}"})
    try:
        train_config(t, source="-", output_dir="-")
    except ValidationError as err:
        for line in format_validation_error(err):
            where, _, message = line.partition(": ")
            field = "training" if where == "config" else f"training.{where.split('.', 1)[-1]}"
            problems.append({"field": field, "message": message})
    return problems


def check_dataset(location: str, settings: Settings) -> list[Problem]:
    """A local location must exist inside an allowed root (symlinks resolved); remote ones must be archives or s3."""
    field = "dataset"
    if location.startswith(REMOTE_SCHEMES):
        if location.startswith(("http://", "https://")) and not location.lower().endswith(ARCHIVE_SUFFIXES):
            return [{"field": field, "message": "an http(s) dataset must be a .tar, .tar.gz or .zip archive"}]
        return []
    if "://" in location and not location.startswith("file://"):
        return [{"field": field, "message": f"unsupported scheme in {location!r}; use a path, file://, "
                                            "http(s):// or s3://"}]
    raw = location.removeprefix("file://")
    if ".." in Path(raw).parts:
        return [{"field": field, "message": "'..' is not allowed in dataset paths; give the full path"}]
    if not Path(raw).is_absolute():
        return [{"field": field, "message": f"dataset path must be absolute, got {raw!r}"}]
    resolved = Path(raw).resolve()
    roots = [Path(r).resolve() for r in settings.allowed_roots]
    if roots and not any(resolved.is_relative_to(root) for root in roots):
        return [{"field": field, "message": f"{raw} is outside the allowed dataset roots "
                                            f"({', '.join(map(str, roots))}); symlinks are resolved first"}]
    if not resolved.exists():
        return [{"field": field, "message": f"{raw} does not exist"}]
    if roots and resolved.is_file() and resolved.name.lower().endswith(LIST_SUFFIXES):
        try:  # the list itself is inside a root; every image it names must be too
            ListFileSource(resolved, confine_to=roots)
        except DataError as err:
            return [{"field": field, "message": str(err)}]
    return []


def check_gpus(training: TrainingSpec, settings: Settings) -> list[Problem]:
    """A job may ask for at most ``max_job_gpus`` devices (no worker would ever take more)."""
    if training.gpus > settings.max_job_gpus:
        return [{"field": "training.gpus",
                 "message": f"this deployment runs jobs on at most {settings.max_job_gpus} GPU(s) "
                            f"(SIMMIM_MAX_JOB_GPUS), got {training.gpus}"}]
    return []


def check_webhook(webhook: WebhookSpec | None, settings: Settings) -> list[Problem]:
    """Unless private addresses are allowed, the webhook host must resolve to public ones only.

    Checked again on every delivery, which connects only to addresses it has just checked.
    """
    if webhook is None or settings.webhook_allow_private:
        return []
    url = webhook.url
    try:
        checked_addresses(url.host or "", url.port or 443, allow_private=False)
    except AddressRefused as err:
        return [{"field": "webhook.url", "message": str(err)}]
    return []


def check_job(job: JobCreate, settings: Settings) -> list[Problem]:
    """Every problem with a job spec; empty when it may be queued."""
    return (check_dataset(job.dataset, settings) + check_training(job.training) + check_gpus(job.training, settings)
            + check_webhook(job.webhook, settings))
