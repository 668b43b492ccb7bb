"""Where a job's run directory lives and how its files reach the artifact store.

On a local (or shared-volume) store the engine writes straight into
``<root>/jobs/<job_id>/``, so publishing is free. On a remote store (``s3://…``) it writes
to ``<work_dir>/jobs/<job_id>/`` and every finished file is uploaded under the same key;
a new attempt on another machine downloads the newest checkpoint before resuming.
Job records only ever hold keys relative to the store root.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from simmim.atomic import atomic_write_with
from simmim_service.artifacts import ArtifactStore, job_prefix


class JobOutputs:
    """The run directory of one job and its mapping to artifact keys."""

    def __init__(self, store: ArtifactStore, job_id: str, work_dir: str | Path) -> None:
        self.store = store
        self.prefix = job_prefix(job_id)
        if store.is_local:
            self.directory = store.local_path(self.prefix)
        else:
            self.directory = Path(work_dir).resolve() / self.prefix

    def key(self, path: Path) -> str:
        """The artifact key of a file inside the run directory."""
        return f"{self.prefix}/{path.resolve().relative_to(self.directory).as_posix()}"

    def path(self, key: str) -> Path:
        """The local file of a key under this job's prefix."""
        if not key.startswith(self.prefix + "/"):
            raise ValueError(f"artifact key {key!r} is not under {self.prefix}/")
        return self.directory / key.removeprefix(self.prefix + "/")

    def publish(self, path: Path) -> str:
        """Make a finished local file available in the store; returns its key."""
        key = self.key(path)
        if not self.store.is_local:
            self.store.put_file(path, key)
        return key

    def publish_checkpoint(self, pt_file: Path) -> str:
        """Upload a checkpoint, then its manifest (which is what makes it visible)."""
        key = self.publish(pt_file)
        self.publish(pt_file.with_suffix(".json"))
        return key

    def restore_checkpoint(self, key: str) -> bool:
        """Download a checkpoint and its manifest into the run directory (remote stores).

        Returns False when the store does not have it; a local store needs nothing.
        """
        if self.store.is_local:
            return True
        manifest = key.removesuffix(".pt") + ".json"
        if not (self.store.exists(key) and self.store.exists(manifest)):
            return False
        for item in (key, manifest):  # manifest last: it makes the checkpoint visible
            download(self.store, item, self.path(item))
        return True


def download(store: ArtifactStore, key: str, target: Path) -> Path:
    """Copy ``key`` from the store to ``target`` atomically; returns ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with store.open(key) as src:
        atomic_write_with(target, lambda dst: shutil.copyfileobj(src, dst, 1 << 20))
    return target
