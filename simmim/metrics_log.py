"""Append-only ``metrics.jsonl``: one ``{key, value, step, timestamp}`` point per line; optionally
the same scalars as TensorBoard events beside it."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsLog:
    """Writes metric points as JSON lines, flushed per write so a crash loses at most one."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, **values: float) -> None:
        stamp = datetime.now(UTC).isoformat()
        lines = [json.dumps({"key": k, "value": v, "step": step, "timestamp": stamp}) for k, v in values.items()]
        with self.path.open("a") as f:
            f.write("\n".join(lines) + "\n")


def read_metrics(path: str | Path, key: str | None = None) -> list[dict[str, object]]:
    """All points in a metrics file, optionally only those of ``key``."""
    p = Path(path)
    if not p.exists():
        return []
    points = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return [pt for pt in points if key is None or pt["key"] == key]


def truncate_after(path: str | Path, step: int) -> None:
    """Drop points logged after ``step`` (a resumed run repeats those steps)."""
    p = Path(path)
    if not p.exists():
        return
    kept = [line for line in p.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    p.write_text("".join(line + "\n" for line in kept))


class TensorBoardLog:
    """The same scalars as TensorBoard event files (``SummaryWriter``) in ``directory``.

    Use :func:`open_tensorboard`, which returns None instead of failing when the
    ``tensorboard`` package is not installed.
    """

    def __init__(self, writer: Any) -> None:
        self._writer = writer

    @property
    def directory(self) -> Path:
        return Path(self._writer.log_dir)

    def write(self, step: int, **values: float) -> None:
        for key, value in values.items():
            self._writer.add_scalar(key, value, global_step=step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def open_tensorboard(directory: str | Path, resume_step: int = 0) -> TensorBoardLog | None:
    """A TensorBoard writer for ``directory``, or None (with a warning) without ``tensorboard``.

    A run resumed at ``resume_step`` logs the steps after it again: events of those steps in
    earlier files are marked purged, so TensorBoard shows each step once.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        log.warning("not writing TensorBoard events (%s); `pip install tensorboard` to get them, "
                    "or set run.tensorboard=false to silence this", err)
        return None
    purge = resume_step + 1 if resume_step > 0 else None
    return TensorBoardLog(SummaryWriter(log_dir=str(directory), purge_step=purge, flush_secs=30))
