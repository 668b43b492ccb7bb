"""Crash-safe training checkpoints: sha256 manifests, pruning, verified loads, RNG capture.

A checkpoint is ``ckpt_{step:08d}.pt`` (``torch.save`` output) plus its manifest
``ckpt_{step:08d}.json``, both written atomically (:mod:`simmim.atomic`), the manifest only
after the ``.pt`` is in place: **a checkpoint exists only once its manifest exists**, so a
killed writer never leaves a visible half-file. Loads re-hash the file and refuse (or, in
:meth:`CheckpointManager.latest_valid`, skip) any that no longer match. One process should
write to a directory at a time; any number may read it.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import json
import logging
import os
import pickle
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from simmim.atomic import (
    TEMP_PREFIX,
    atomic_write_json,
    atomic_write_with,
    fsync_directory,
    sha256_stream,
)
from simmim.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Manifest format this module writes and reads."""

_FILE_RE = re.compile(r"^ckpt_(\d{8,})\.(pt|json)$")
_SAFE_LEAVES = (torch.Tensor, torch.dtype, torch.device)
_SAFE_TYPES = {dict, collections.OrderedDict, list, tuple, set, torch.Size, type(None)}
_SAFE_TYPES |= {str, bytes, bytearray, int, float, complex, bool}
"""Exact types ``torch.load(weights_only=True)`` accepts besides :data:`_SAFE_LEAVES`."""

MapLocation = str | torch.device | dict[str, str] | None


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint as described by its manifest.

    Attributes:
        step: Optimizer step the state was captured after.
        path: The ``.pt`` file.
        sha256: Hex digest of the ``.pt`` file, computed while it was written.
        size: Size of the ``.pt`` file in bytes.
        final: True for the checkpoint written at the end of training; never pruned.
        created_at: UTC creation time, ISO 8601.
    """

    step: int
    path: Path
    sha256: str
    size: int
    final: bool
    created_at: str

    @property
    def id(self) -> str:
        """Stable name of the checkpoint, ``ckpt_{step:08d}`` (same for final ones)."""
        return f"ckpt_{self.step:08d}"


class CheckpointManager:
    """Saves, lists, verifies, prunes and loads the checkpoints of one run directory.

    Args:
        directory: Where checkpoints live; created by the first :meth:`save`, so a manager
            used only to read (export, embed) never creates directories.
        keep_last: How many of the newest non-final checkpoints to keep (>= 1). Final
            checkpoints are always kept.
    """

    def __init__(self, directory: str | Path, keep_last: int = 3) -> None:
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ConfigError([f"keep_last must be an integer >= 1, got {keep_last!r}"])
        self.directory = Path(directory)
        self.keep_last = keep_last

    def save(self, state: dict[str, Any], step: int, final: bool = False) -> CheckpointInfo:
        """Atomically write ``state`` as the checkpoint for ``step``, then prune old ones.

        ``state`` may hold only what ``torch.load(weights_only=True)`` accepts (tensors,
        containers, str/bytes, numbers, bool, None, torch dtype/device/Size, or classes
        registered with ``torch.serialization.add_safe_globals``), so loading never runs
        pickled code. This is checked before writing, not discovered at resume time.

        Raises:
            CheckpointError: ``step`` is invalid or ``state`` holds an unsupported type.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CheckpointError(f"checkpoint step must be an integer >= 0, got {step!r}")
        if problem := _find_unsafe(state, "state"):
            raise CheckpointError(
                f"cannot checkpoint step {step}: {problem}; convert it to a tensor, list or "
                "plain number (e.g. ndarray.tolist(), float(x)) so it loads with weights_only=True"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        started = time.time()
        pt = self._path(step, "pt")
        digest = atomic_write_with(pt, lambda fh: torch.save(state, fh))
        created = datetime.now(UTC).isoformat(timespec="milliseconds")
        info = CheckpointInfo(step, pt, digest, pt.stat().st_size, final, created)
        manifest = {"step": step, "file": pt.name, "sha256": digest, "size": info.size}
        manifest |= {"final": final, "created_at": created, "format_version": FORMAT_VERSION}
        atomic_write_json(self._path(step, "json"), manifest)
        self._prune(step)
        self._remove_stale_temps(started)
        return info

    def list(self) -> builtins.list[CheckpointInfo]:
        """Return every checkpoint with a readable manifest, oldest first (files not hashed)."""
        infos = []
        for manifest in self.directory.glob("ckpt_*.json"):
            if _FILE_RE.match(manifest.name) and (info := self._read_manifest(manifest)):
                infos.append(info)
        return sorted(infos, key=lambda i: i.step)

    def verify(self, info: CheckpointInfo) -> None:
        """Check that ``info.path`` exists and matches the manifest's size and sha256.

        Raises:
            CheckpointError: The file is missing, truncated or its content differs.
        """
        with _open_verified(info):
            pass

    def latest_valid(self) -> CheckpointInfo | None:
        """Return the newest checkpoint whose file verifies, or None if there is none.

        Missing or corrupt checkpoints are logged at WARNING and skipped, not deleted, so
        they stay available for inspection.
        """
        for info in reversed(self.list()):
            try:
                self.verify(info)
            except CheckpointError as exc:
                logger.warning("%s", exc)
                continue
            return info
        return None

    def load(self, info: CheckpointInfo, map_location: MapLocation = "cpu") -> dict[str, Any]:
        """Verify and load a checkpoint with ``torch.load(weights_only=True)``.

        Hashing and parsing use one open descriptor, so a concurrent re-save of the same
        step cannot swap in bytes that were not verified.

        Raises:
            CheckpointError: The file is missing or corrupt, or it is not a dict loadable
                with ``weights_only=True``.
        """
        with _open_verified(info) as fh:
            try:
                state = torch.load(fh, map_location=map_location, weights_only=True)
            except (pickle.UnpicklingError, RuntimeError) as exc:
                raise CheckpointError(
                    f"checkpoint {info.id} ({info.path}) cannot be loaded safely: {exc}. "
                    "Re-save it with only tensors, containers and plain numbers."
                ) from exc
        if not isinstance(state, dict):
            raise CheckpointError(
                f"checkpoint {info.id} ({info.path}) holds a {type(state).__name__}, expected "
                "a dict; it was not written by CheckpointManager.save"
            )
        return state

    def _path(self, step: int, suffix: str) -> Path:
        return self.directory / f"ckpt_{step:08d}.{suffix}"

    def _read_manifest(self, manifest: Path) -> CheckpointInfo | None:
        """Parse one manifest; log and return None if it is unreadable or from a newer format."""
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            if (version := data.get("format_version")) != FORMAT_VERSION:
                raise ValueError(f"unknown format_version {version!r}; upgrade simmim to read it")
            name = str(data["file"])
            if Path(name).name != name:
                raise ValueError(f"file {name!r} is not a plain file name")
            return CheckpointInfo(
                step=int(data["step"]),
                path=self.directory / name,
                sha256=str(data["sha256"]),
                size=int(data["size"]),
                final=bool(data["final"]),
                created_at=str(data["created_at"]),
            )
        except FileNotFoundError:
            return None  # pruned while we were listing
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.warning("ignoring unreadable checkpoint manifest %s: %s", manifest, exc)
            return None

    def _prune(self, current: int) -> None:
        """Delete old non-final checkpoints and ``.pt`` files that never got a manifest.

        Manifests go first (and the directory is synced) so a crash mid-prune leaves at
        worst an orphan ``.pt``, which is invisible and removed by the next save.
        """
        infos = self.list()
        non_final = [i for i in infos if not i.final]
        doomed = [i for i in non_final[: -self.keep_last] if i.step != current]
        for info in doomed:
            with contextlib.suppress(FileNotFoundError):
                self._path(info.step, "json").unlink()
        if doomed:
            fsync_directory(self.directory)
        kept_files = {i.path.name for i in infos if i not in doomed}
        for pt in self.directory.glob("ckpt_*.pt"):
            if _FILE_RE.match(pt.name) and pt.name not in kept_files:
                with contextlib.suppress(FileNotFoundError):
                    pt.unlink()

    def _remove_stale_temps(self, before: float) -> None:
        """Remove checkpoint temp files last modified before ``before`` (killed writers)."""
        for tmp in self.directory.glob(f"{TEMP_PREFIX}ckpt_*"):
            with contextlib.suppress(FileNotFoundError):
                if tmp.stat().st_mtime < before:
                    tmp.unlink()
                    logger.info("removed leftover temporary file %s", tmp)


@contextlib.contextmanager
def _open_verified(info: CheckpointInfo) -> Iterator[BinaryIO]:
    """Open ``info.path``, check its size and sha256, and yield it rewound to the start.

    Raises:
        CheckpointError: The file is missing or does not match the manifest.
    """
    try:
        fh = open(info.path, "rb")  # noqa: SIM115 - closed by the ``with`` below
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {info.id} file {info.path} is missing; it will be skipped"
        ) from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if size != info.size:
            problem = f"size {size} bytes, manifest says {info.size}"
        elif sha256_stream(fh) != info.sha256:
            problem = "sha256 mismatch"
        else:
            problem = ""
        if problem:
            raise CheckpointError(
                f"checkpoint {info.id} is corrupt ({problem}); it will be skipped"
            )
        fh.seek(0)
        yield fh


def _find_unsafe(obj: Any, where: str) -> str | None:
    """Return a description of the first value ``weights_only`` loading would refuse."""
    kind = type(obj)
    if isinstance(obj, _SAFE_LEAVES) or kind in torch.serialization.get_safe_globals():
        return None
    if kind not in _SAFE_TYPES:
        return f"{where} is a {kind.__module__}.{kind.__qualname__}"
    if isinstance(obj, dict):
        for key, value in obj.items():
            found = _find_unsafe(key, f"{where} key") or _find_unsafe(value, f"{where}[{key!r}]")
            if found:
                return found
    elif isinstance(obj, list | tuple | set):
        for index, item in enumerate(obj):
            if found := _find_unsafe(item, f"{where}[{index}]"):
                return found
    return None


def rng_state() -> dict[str, Any]:
    """Capture python, numpy (global), torch CPU and all CUDA RNG states.

    Everything is stored as tensors, lists and plain numbers so the result can go into a
    checkpoint that loads with ``weights_only=True``.
    """
    version, internal, gauss_next = random.getstate()
    np_state: dict[str, Any] = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": str(np_state["bit_generator"]),
            "key": np_state["state"]["key"].tolist(),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore RNG states captured by :func:`rng_state`.

    CUDA states are restored for the devices both runs have; a device-count mismatch
    (e.g. resuming a GPU run on CPU) is logged at WARNING.

    Raises:
        CheckpointError: ``state`` lacks a part or a part has the wrong shape.
    """
    try:
        py, npy = state["python"], state["numpy"]
        random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
        key = np.asarray(npy["key"], dtype=np.uint32)
        np.random.set_state((npy["bit_generator"], key, npy["pos"], npy["has_gauss"], npy["gauss"]))
        torch.set_rng_state(state["torch"].cpu())
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(
            f"RNG state is incomplete or malformed ({type(exc).__name__}: {exc}); it must come "
            "from simmim.checkpoint.rng_state(). Resume without it or from another checkpoint."
        ) from exc
    _set_cuda_rng_state(state.get("cuda"))


def _set_cuda_rng_state(saved: builtins.list[torch.Tensor] | None) -> None:
    """Restore per-device CUDA generators, warning when the device count changed."""
    if saved is None:
        return
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(saved) != available:
        message = "CUDA RNG state saved for %d device(s), %d available; GPU randomness will differ"
        logger.warning(message, len(saved), available)
    for device, generator_state in enumerate(saved[:available]):
        torch.cuda.set_rng_state(generator_state.cpu(), device)
