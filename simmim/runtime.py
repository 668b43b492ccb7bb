"""Device, precision and process-group setup shared by training and inference."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from simmim.errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    """Where this process computes and how it relates to its peers."""

    device: torch.device
    amp_dtype: torch.dtype | None
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """bf16 autocast when enabled, otherwise a no-op."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks this process's CUDA device when there is one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError([f"run.device: {spec!r} is not a device; use auto, cpu, cuda or cuda:N"]) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(["run.device: cuda requested but no CUDA device is available; use run.device=cpu"])
    return device


def resolve_amp(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA for ``auto``; fp32 (no autocast) on CPU unless bf16 is asked for."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def setup_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """Join the process group when started by torchrun (WORLD_SIZE > 1), then pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Runtime(dev, resolve_amp(precision, dev), rank, world_size, local_rank)


def teardown_runtime(rt: Runtime) -> None:
    """Leave the process group if this process joined one."""
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()
