"""The embedding tasks: a per-process LRU cache of encoders and batched inference.

Encoders are loaded from a job's artifacts: the exported encoder by default, or any
recorded checkpoint. Inputs the caller can fix (bad images, unknown checkpoint, bad
options) raise ``ValueError`` with a message for the user; the API maps it to 422.
"""

from __future__ import annotations

import base64
import binascii
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from jobstore import repo
from jobstore.models import Checkpoint
from worker.context import WorkerContext
from worker.outputs import download

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from simmim.embed import Embedder, Pooling

BATCH_SIZE = 64
POOLINGS = ("mean", "cls")
CacheKey = tuple[str, str]


class EncoderCache:
    """The ``size`` most recently used encoders of this process, keyed by (job, checkpoint)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[CacheKey, Embedder] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: CacheKey, load: Callable[[], Embedder]) -> Embedder:
        """The cached encoder for ``key``, loading it (and evicting the oldest) if needed."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            embedder = load()
            self._items[key] = embedder
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return embedder

    def keys(self) -> list[CacheKey]:
        with self._lock:
            return list(self._items)


_caches: dict[int, EncoderCache] = {}


def encoder_cache(size: int) -> EncoderCache:
    """This process's cache (one per configured size, in practice one)."""
    return _caches.setdefault(size, EncoderCache(size))


def load_encoder(ctx: WorkerContext, job_id: str, checkpoint_id: str | None) -> Embedder:
    """The job's encoder, from the LRU cache or its artifacts.

    Raises:
        ValueError: The checkpoint is unknown or gone, or the job has no encoder yet.
    """
    key = (job_id, checkpoint_id or "encoder")
    cache = encoder_cache(ctx.settings.embed_cache_size)
    return cache.get(key, lambda: _load(ctx, _artifact_record(ctx, job_id, checkpoint_id)))


def _artifact_record(ctx: WorkerContext, job_id: str, checkpoint_id: str | None) -> Checkpoint:
    with ctx.sessions() as session:
        if checkpoint_id is not None:
            record = repo.get_checkpoint(session, job_id=job_id, checkpoint_id=checkpoint_id)
            if record is None:
                raise ValueError(f"checkpoint {checkpoint_id!r} does not exist for job {job_id}")
            return record
        encoders = [c for c in repo.list_checkpoints(session, job_id=job_id) if c.kind == "encoder"]
    if not encoders:
        raise ValueError(f"job {job_id} has no exported encoder yet (it is written when training "
                         "succeeds); wait for the job or pass a checkpoint_id")
    return encoders[-1]


def _load(ctx: WorkerContext, record: Checkpoint) -> Embedder:
    from simmim.embed import Embedder

    siblings = ["config.json"] if record.kind == "encoder" else [Path(record.uri).with_suffix(".json").name]
    path = _local_copy(ctx, record.uri, siblings)
    return Embedder.load(path.parent if record.kind == "encoder" else path, precision="auto")


def _local_copy(ctx: WorkerContext, key: str, siblings: list[str]) -> Path:
    """A local path of ``key`` (and the named files next to it), downloaded from remote stores."""
    store = ctx.store
    if not store.exists(key):
        raise ValueError(f"artifact {key} is no longer in the artifact store (old checkpoints are "
                         "pruned, see training.keep_last); use a newer checkpoint")
    if store.is_local:
        return store.local_path(key)
    cache_dir = Path(ctx.settings.work_dir).resolve() / "cache"
    parent = key.rpartition("/")[0]
    for item in [key, *(f"{parent}/{name}" for name in siblings)]:
        if not (cache_dir / item).is_file():
            download(store, item, cache_dir / item)
    return cache_dir / key


def decode_images(images_b64: list[str], max_pixels: int) -> list[Image.Image]:
    """Decode base64 (optionally ``data:`` URL) images.

    Raises:
        ValueError: Naming the first image that is not base64 or not a readable image.
    """
    from simmim.data import decode_image
    from simmim.errors import ImageDecodeError

    images = []
    for i, text in enumerate(images_b64):
        if not isinstance(text, str):
            raise ValueError(f"images[{i}]: expected a base64 string, got {type(text).__name__}")
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"images[{i}]: not valid base64") from None
        try:
            images.append(decode_image(data, f"images[{i}]", max_pixels))
        except ImageDecodeError as err:
            raise ValueError(f"images[{i}]: {err.reason}") from None
    return images


def embed_images(ctx: WorkerContext, *, job_id: str, checkpoint_id: str | None, images_b64: list[str],
                 pooling: str = "mean", layer: int | None = None, normalize: bool = False) -> dict[str, Any]:
    """The ``simmim.embed`` task body: embeddings of the given images, in order."""
    from simmim.errors import ConfigError

    limit = ctx.settings.max_embed_images
    if not images_b64 or len(images_b64) > limit:
        raise ValueError(f"send between 1 and {limit} images, got {len(images_b64)}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    images = decode_images(images_b64, ctx.settings.max_image_pixels)
    embedder = load_encoder(ctx, job_id, checkpoint_id)
    try:
        vectors = embed_batches(embedder, [embedder.transform(img) for img in images],
                                pooling=cast("Pooling", pooling), layer=layer, normalize=normalize)
    except ConfigError as err:  # bad layer index, cls pooling on a model without a class token
        raise ValueError("; ".join(err.problems)) from None
    return {"embeddings": vectors.tolist(), "dim": int(vectors.shape[1]), "checkpoint_id": checkpoint_id,
            "model": str(embedder.config["timm_name"])}


def embed_batches(embedder: Embedder, tensors: list[torch.Tensor], *, pooling: Pooling, layer: int | None,
                  normalize: bool, batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """(N, D) embeddings of preprocessed (3, S, S) tensors, ``batch_size`` at a time."""
    import torch

    chunks = [embedder.embed_tensors(torch.stack(tensors[i:i + batch_size]), pooling, layer, normalize)
              for i in range(0, len(tensors), batch_size)]
    return torch.cat(chunks)
