"""Fault injection for the fault tests and ``bench/faults.py``. Off unless ``SIMMIM_FAULTS`` is set.

``SIMMIM_FAULTS`` is a JSON object read by each training attempt:

* ``oom_above_batch: N`` — every optimiser step whose micro-batch is larger than N raises
  ``torch.OutOfMemoryError`` (the CUDA out-of-memory type), as a GPU with room for N would.
* ``hang_at_step: N`` — at step N training stops responding (ignores cancel), like a
  process stuck in a driver call.
* ``die_in_checkpoint_at_step: N`` — the process is SIGKILLed while the checkpoint of step
  N is being written (file complete in its temporary name, not yet renamed or listed).
* ``once_dir: PATH`` — ``hang`` and ``die`` fire once per job (a marker file in PATH), so the
  attempt that resumes afterwards runs clean.

No production setting turns any of this on; the worker only reads the variable.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from simmim.engine import Progress

ENV = "SIMMIM_FAULTS"


@dataclass(frozen=True)
class Faults:
    """The faults to inject into one training attempt."""

    oom_above_batch: int | None = None
    hang_at_step: int | None = None
    die_in_checkpoint_at_step: int | None = None
    once_dir: str | None = None

    @classmethod
    def from_env(cls) -> Faults:
        raw = os.environ.get(ENV, "").strip()
        return cls(**json.loads(raw)) if raw else cls()

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.oom_above_batch, self.hang_at_step, self.die_in_checkpoint_at_step))

    def _first_time(self, job_id: str, fault: str) -> bool:
        if self.once_dir is None:
            return True
        marker = Path(self.once_dir) / f"{job_id}.{fault}"
        if marker.exists():
            return False
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        return True

    def wrap_progress(self, job_id: str, batch_size: int,
                      callback: Callable[[Progress], None]) -> Callable[[Progress], None]:
        """``callback`` plus the step-time faults (OOM for large micro-batches, hang)."""
        if not self.active:
            return callback

        def faulty(progress: Progress) -> None:
            if self.oom_above_batch is not None and batch_size > self.oom_above_batch:
                import torch

                raise torch.OutOfMemoryError(f"CUDA out of memory (injected: micro-batch {batch_size} > "
                                             f"{self.oom_above_batch})")
            callback(progress)
            if (self.hang_at_step is not None and progress.step >= self.hang_at_step
                    and self._first_time(job_id, "hang")):
                while True:  # deaf to cancel, like a stuck driver call
                    time.sleep(1)

        return faulty

    def install_checkpoint_fault(self, job_id: str) -> None:
        """Make the checkpoint write of ``die_in_checkpoint_at_step`` kill this process midway."""
        if self.die_in_checkpoint_at_step is None:
            return
        import simmim.checkpoint as checkpoint

        original = checkpoint.atomic_write_with
        target = f"ckpt_{self.die_in_checkpoint_at_step:08d}.pt"

        def dying_write(path: Any, writer: Callable[[Any], None]) -> str:
            if Path(path).name != target or not self._first_time(job_id, "die"):
                return original(path, writer)

            def write_then_die(fh: Any) -> None:
                writer(fh)
                fh.flush()
                os.kill(os.getpid(), signal.SIGKILL)  # before the rename: a torn write

            return original(path, write_then_die)

        checkpoint.atomic_write_with = dying_write
