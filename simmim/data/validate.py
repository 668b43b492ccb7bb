"""Check every image of a source before training, so bad files are found up front.

Each image is fully decoded (a header-only check would miss truncated files), one at a
time; only names and sizes are kept, so memory stays flat however large the dataset is.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from simmim.data.images import DEFAULT_MAX_PIXELS, decode_image
from simmim.data.sources import ImageSource
from simmim.errors import ImageDecodeError

_SHOWN_PROBLEMS = 20

# (index, None, (width, height)) for a decoded image, (index, reason, None) for a failure.
_Outcome = tuple[int, str | None, tuple[int, int] | None]


@dataclass
class DataReport:
    """What validation found.

    Attributes:
        total: Images checked.
        ok: Images that decode and are at least ``min_size`` pixels on each side.
        unreadable: (name, reason) of images that cannot be decoded.
        tiny: (name, width, height) of images that decode but have a side below ``min_size``
            (training still uses them, upscaled). ``total == ok + len(unreadable) + len(tiny)``.
        min_size: The size threshold used for ``tiny``.
    """

    total: int = 0
    ok: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    tiny: list[tuple[str, int, int]] = field(default_factory=list)
    min_size: int = 16

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the same fields (lists of lists)."""
        data = asdict(self)
        data["unreadable"] = [list(item) for item in self.unreadable]
        data["tiny"] = [list(item) for item in self.tiny]
        return data

    def summary(self) -> str:
        """A few human lines, listing at most 20 problem files."""
        lines = [
            f"checked {self.total} images: {self.ok} ok, {len(self.unreadable)} unreadable, "
            f"{len(self.tiny)} smaller than {self.min_size} px on a side"
        ]
        problems = [f"  unreadable  {name}: {reason}" for name, reason in self.unreadable]
        problems += [f"  tiny        {name}: {w}x{h}" for name, w, h in self.tiny]
        lines += problems[:_SHOWN_PROBLEMS]
        if len(problems) > _SHOWN_PROBLEMS:
            lines.append(f"  ... and {len(problems) - _SHOWN_PROBLEMS} more")
        if self.unreadable:
            lines.append("unreadable images are skipped during training; remove or fix them.")
        return "\n".join(lines)


def _check_one(source: ImageSource, i: int, max_pixels: int) -> _Outcome:
    try:
        img = decode_image(source.read_bytes(i), source.name(i), max_pixels)
    except ImageDecodeError as err:
        return i, err.reason, None
    return i, None, img.size


def _outcomes(source: ImageSource, workers: int, max_pixels: int) -> Iterator[_Outcome]:
    """Check every image, in any order, keeping at most a few checks in flight."""
    if workers <= 0:
        for i in range(len(source)):
            yield _check_one(source, i, max_pixels)
        return
    # Threads suffice: Pillow releases the GIL while decoding, and sources are thread-safe.
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        pending: set[cf.Future[_Outcome]] = set()
        for i in range(len(source)):
            pending.add(pool.submit(_check_one, source, i, max_pixels))
            if len(pending) >= 4 * workers:
                done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                yield from (future.result() for future in done)
        yield from (future.result() for future in cf.as_completed(pending))


def validate_source(
    source: ImageSource,
    min_size: int = 16,
    workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DataReport:
    """Decode every image of a source and report the unreadable and tiny ones.

    Args:
        source: The images to check.
        min_size: Images with a side shorter than this are reported as tiny.
        workers: Threads decoding in parallel; 0 checks in the calling thread.
        progress: Called as ``progress(done, total)`` after each image.
        max_pixels: Images with more pixels than this are reported as unreadable.

    Returns:
        The report; its problem lists are in source order.
    """
    total = len(source)
    found: list[_Outcome] = []
    report = DataReport(total=total, min_size=min_size)
    for done, outcome in enumerate(_outcomes(source, workers, max_pixels), start=1):
        _, reason, size = outcome
        if reason is None and size is not None and min(size) >= min_size:
            report.ok += 1
        else:
            found.append(outcome)
        if progress is not None:
            progress(done, total)
    for i, reason, size in sorted(found, key=lambda outcome: outcome[0]):
        if reason is not None:
            report.unreadable.append((source.name(i), reason))
        elif size is not None:
            report.tiny.append((source.name(i), size[0], size[1]))
    return report
