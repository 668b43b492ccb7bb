"""Append-only ``metrics.jsonl``: one ``{key, value, step, timestamp}`` point per line."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path


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
