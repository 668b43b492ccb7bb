"""Reconstruction previews and metric plots of a tenant's job.

Previews are read from the artifact store (``jobs/<id>/previews/step_XXXXXXXX.png``, written by
the engine at every checkpoint and uploaded by the worker), so the listing works the same on a
local directory and on S3. Plots are drawn from the job store's metric points.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict

from sqlalchemy.orm import Session

from api.errors import NotFound, Unprocessable, validation_detail
from api.plotting import MIN_PANEL, Series, render_plot
from api.schemas.previews import PreviewPublic, PreviewsPublic
from api.services.jobs import get_job
from jobstore import repo
from simmim_service.artifacts import ArtifactStore, job_prefix

PREVIEW_NAME = r"^step_\d{8}\.png$"
"""A preview's file name (the same as ``simmim.preview.PREVIEW_NAME``, which imports torch)."""
_PREVIEW_NAME = re.compile(PREVIEW_NAME)
MAX_PREVIEW_BYTES = 64 << 20
"""Larger files under ``previews/`` are not served (a 64-image grid of 1024 px images is ~100 MB
raw, a few MB as PNG)."""
STANDARD_KEYS = ("loss", "lr", "images_per_sec", "data_wait_fraction")
"""Metrics every training job reports; they can be plotted before the first point arrives."""
MAX_PLOT_KEYS = 8
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _previews_folder(job_id: str) -> str:
    return f"{job_prefix(job_id)}/previews"


class _SizeCache:
    """(width, height) of preview keys already read: one small read per new preview, not per listing."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str], tuple[int, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, store: ArtifactStore, key: str) -> tuple[int, int] | None:
        with self._lock:
            found = self._items.get((store.root, key))
        if found is not None:
            return found
        size = png_size(store, key)
        if size is not None:
            with self._lock:
                self._items[(store.root, key)] = size
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
        return size


_sizes = _SizeCache()


def png_size(store: ArtifactStore, key: str) -> tuple[int, int] | None:
    """(width, height) from a PNG's header, or None when ``key`` is gone or is not a PNG."""
    try:
        with store.open(key) as fh:
            head = fh.read(24)
    except FileNotFoundError:
        return None
    if len(head) < 24 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def list_previews(*, session: Session, artifacts: ArtifactStore, tenant: str, job_id: str) -> PreviewsPublic:
    """Every preview of the job in the store, oldest first."""
    get_job(session=session, tenant=tenant, job_id=job_id)
    folder = _previews_folder(job_id)
    items = []
    for key in artifacts.list(folder):
        name = key.removeprefix(folder + "/")
        if not _PREVIEW_NAME.match(name):  # temporary files of an atomic write, anything else
            continue
        size = _sizes.get(artifacts, key)
        if size is None:
            continue
        items.append(PreviewPublic(name=name, step=int(name[5:13]), width=size[0], height=size[1],
                                   url=f"/v1/jobs/{job_id}/previews/{name}"))
    return PreviewsPublic(data=sorted(items, key=lambda p: p.step))


def preview_png(*, session: Session, artifacts: ArtifactStore, tenant: str, job_id: str, name: str) -> bytes:
    """The bytes of one preview; ``NotFound`` for a name the job has no preview of."""
    get_job(session=session, tenant=tenant, job_id=job_id)
    missing = NotFound(f"job {job_id} has no preview {name!r}; list them at /v1/jobs/{job_id}/previews")
    if not _PREVIEW_NAME.match(name):
        raise missing
    key = f"{_previews_folder(job_id)}/{name}"
    try:
        with artifacts.open(key) as fh:
            data = fh.read(MAX_PREVIEW_BYTES + 1)
    except FileNotFoundError:
        raise missing from None
    if len(data) > MAX_PREVIEW_BYTES or not data.startswith(_PNG_SIGNATURE):
        raise missing
    return data


def parse_keys(raw: str) -> list[str]:
    """``loss, lr,loss`` -> ``["loss", "lr"]`` (order kept, duplicates and blanks dropped)."""
    keys: list[str] = []
    for part in raw.split(","):
        key = part.strip()
        if key and key not in keys:
            keys.append(key)
    return keys


def plot_png(*, session: Session, tenant: str, job_id: str, keys: str, width: int, height: int | None) -> bytes:
    """One panel per metric over steps, as PNG.

    Raises:
        Unprocessable: No key, too many, a key that is neither standard nor reported by the job,
            or panels smaller than ``MIN_PANEL``.
    """
    job = get_job(session=session, tenant=tenant, job_id=job_id)
    wanted = parse_keys(keys)
    known = set(STANDARD_KEYS) | {k for k in (job.latest_metrics or {}) if k != "step"}
    problems: list[dict[str, str]] = []
    if not wanted:
        problems.append({"field": "query.keys", "message": "name at least one metric, e.g. keys=loss,lr"})
    elif len(wanted) > MAX_PLOT_KEYS:
        problems.append({"field": "query.keys",
                         "message": f"at most {MAX_PLOT_KEYS} metrics per plot, got {len(wanted)}"})
    unknown = [k for k in wanted if k not in known]
    if unknown:
        problems.append({"field": "query.keys", "message": f"unknown metric(s) {', '.join(map(repr, unknown))}; "
                                                           f"this job has {', '.join(sorted(known))}"})
    panels = max(len(wanted), 1)
    height = height if height is not None else 220 * panels
    if height // panels < MIN_PANEL[1]:
        problems.append({"field": "query.height",
                         "message": f"{height} px leaves {height // panels} px per metric; give at least "
                                    f"{MIN_PANEL[1]} px each ({MIN_PANEL[1] * panels} for {panels} metrics)"})
    if problems:
        raise Unprocessable(validation_detail(problems), errors=problems)
    max_points = min(width, 2000)
    series: list[Series] = [(key, [(p.step, p.value) for p in
                                   repo.metric_history(session, job_id=job_id, key=key, max_points=max_points)])
                            for key in wanted]
    return render_plot(series, width, height)
