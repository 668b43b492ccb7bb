"""Where a job's run directory lives and how its files reach the artifact store.

On a local (or shared-volume) store the engine writes straight into
``<root>/jobs/<job_id>/``, so publishing is free. On a remote store (``s3://…``) it writes
to ``<work_dir>/jobs/<job_id>/`` and every finished file is uploaded under the same key;
a new attempt on another machine downloads the newest checkpoint before resuming, and the
checkpoints the trainer prunes (``keep_last``) are deleted from the store as well, so that the
store's ``checkpoints/`` folder mirrors the run directory's (as the job's records do). Once
the job has finished (succeeded, failed or cancelled) and its files are uploaded, the scratch
copy is deleted: a worker's disk holds only the jobs it is running or may resume.
Job records only ever hold keys relative to the store root.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from simmim.atomic import atomic_write_with
from simmim_service.artifacts import ArtifactStore, job_prefix

log = logging.getLogger(__name__)
CHECKPOINT_FILE = re.compile(r"^ckpt_\d{8,}\.(pt|json)$")
"""The names :class:`simmim.checkpoint.CheckpointManager` writes (and prunes)."""
PREVIEW_DIR = "previews"
"""Where the engine writes ``step_XXXXXXXX.png`` (:data:`simmim.preview.PREVIEW_DIR`; not imported:
that module imports torch, and this one runs in the worker's parent process)."""
TENSORBOARD_DIR = "tensorboard"
JOB_DIR = re.compile(r"^job_[0-9a-z]+$")
"""A job's folder under ``<work_dir>/jobs`` (ids from :func:`jobstore.ids.new_id`)."""


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
        """Upload a checkpoint, then its manifest (which is what makes it visible).

        On a remote store, checkpoints of this job that are no longer in the local
        ``checkpoints/`` folder (pruned by ``keep_last``, or older than the one a resumed
        attempt started from) are then deleted from the store.
        """
        key = self.publish(pt_file)
        self.publish(pt_file.with_suffix(".json"))
        if not self.store.is_local:
            self.drop_pruned(pt_file.parent)
        return key

    def publish_preview(self, step: int) -> str | None:
        """Upload the reconstruction preview of ``step`` (``previews/step_XXXXXXXX.png``) if the
        engine wrote one; returns its key. A failed upload is logged, never raised."""
        path = self.directory / PREVIEW_DIR / f"step_{step:08d}.png"
        if not path.is_file():
            return None
        try:
            return self.publish(path)
        except Exception as err:  # any driver error: a missing preview must not fail the job
            log.warning("could not upload the preview %s to the artifact store: %s", path.name, err)
            return None

    def publish_tensorboard(self) -> list[str]:
        """Upload the TensorBoard event files (``tensorboard/``); returns their keys.

        Best effort, like previews: a failure is logged and the keys uploaded so far returned.
        """
        folder = self.directory / TENSORBOARD_DIR
        keys: list[str] = []
        if not folder.is_dir():
            return keys
        try:
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                keys.append(self.publish(path))
        except Exception as err:  # any driver error
            log.warning("could not upload the TensorBoard events to the artifact store: %s", err)
        return keys

    def drop_pruned(self, checkpoints: Path) -> list[str]:
        """Delete the store's checkpoint files of this job that ``checkpoints`` no longer holds.

        Manifests go first, so a checkpoint never stays visible without its file. Returns
        the deleted keys. A failure is logged, never raised: it leaves files behind, it does
        not lose any, and the job must not fail for it.
        """
        folder = self.key(checkpoints)
        deleted: list[str] = []
        try:
            keys = [k for k in self.store.list(folder)
                    if CHECKPOINT_FILE.match(k.rsplit("/", 1)[-1]) and not self.path(k).is_file()]
            for key in sorted(keys, key=lambda k: not k.endswith(".json")):
                self.store.delete(key)
                deleted.append(key)
        except Exception as err:  # any driver error (network, permissions)
            log.warning("could not delete pruned checkpoints under %s from the artifact store: %s",
                        folder, err)
        return deleted

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

    def restore_newest(self, recorded: Iterable[tuple[int, str, str]]) -> str | None:
        """Make the run directory hold the newest recorded checkpoint the store still has.

        ``recorded`` is the job's checkpoint records as ``(step, key, sha256)``. Nothing is
        downloaded when the run directory already has that checkpoint (same sha256) or a newer
        one. Unlike "restore only into an empty directory", this also brings a host forward that
        ran an earlier attempt and kept its (now older) checkpoints, so it does not train the
        steps another host has trained since. Returns the key it restored, or None.
        """
        from simmim.checkpoint import CheckpointManager  # torch: never in a worker's parent process

        if self.store.is_local:
            return None
        local = {self.key(c.path): c for c in CheckpointManager(self.directory / "checkpoints").list()}
        newest_local = max((c.step for c in local.values()), default=-1)
        for step, key, sha256 in sorted(recorded, reverse=True):
            if step < newest_local or (key in local and local[key].sha256 == sha256):
                return None
            if self.restore_checkpoint(key):
                return key
        return None


    def discard_scratch(self) -> bool:
        """Delete the run directory of a finished job from this worker's scratch space.

        Only on a remote store, where the directory is a worker-local copy (on a local store it
        *is* the store). Call it once the job's files are in the store. Returns whether it
        deleted anything; a failure is logged, never raised.
        """
        if self.store.is_local or not self.directory.exists():
            return False
        try:
            shutil.rmtree(self.directory)
        except OSError as err:
            log.warning("could not delete the scratch copy %s of a finished job: %s", self.directory, err)
            return False
        return True


def sweep_finished_scratch(work_dir: str | Path, finished: Callable[[list[str]], set[str]]) -> list[str]:
    """Delete the scratch run directories under ``work_dir/jobs`` of jobs that have ended.

    A job handed back here and finished on another machine leaves its copy behind; the next
    job this worker finishes sweeps it. ``finished`` maps job ids to those that have ended (the
    job store decides; a running or recovering job may still need its copy). Returns the ids
    whose directories were deleted; failures are logged, never raised.
    """
    jobs = Path(work_dir).resolve() / "jobs"
    if not jobs.is_dir():
        return []
    ids = sorted(p.name for p in jobs.iterdir() if p.is_dir() and JOB_DIR.match(p.name))
    deleted = []
    for job_id in sorted(finished(ids)):
        try:
            shutil.rmtree(jobs / job_id)
        except OSError as err:
            log.warning("could not delete the scratch copy of finished job %s: %s", job_id, err)
            continue
        deleted.append(job_id)
    return deleted


def download(store: ArtifactStore, key: str, target: Path) -> Path:
    """Copy ``key`` from the store to ``target`` atomically; returns ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with store.open(key) as src:
        atomic_write_with(target, lambda dst: shutil.copyfileobj(src, dst, 1 << 20))
    return target
