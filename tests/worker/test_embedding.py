"""``simmim.embed`` and ``simmim.embed_dataset`` against a real worker and a job it trained."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jobstore import repo
from jobstore.states import JobStatus
from simmim.data import EvalTransform, decode_image, open_source
from simmim.embed import Embedder
from tests.worker.stack import Stack
from worker.celery_app import EMBED_DATASET_TASK, EMBED_QUEUE, EMBED_TASK


@pytest.fixture(scope="module")
def trained(worker: Stack, digits: dict[str, Path]) -> str:
    """The id of a finished tiny job."""
    job_id = worker.create_job(digits["train"], max_steps=4, checkpoint_every=2)
    assert worker.submit(job_id).get(timeout=120) == "succeeded", worker.worker_logs()
    return job_id


def _images(folder: Path, n: int) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.rglob("*.png"))[:n]]


def _embed(stack: Stack, **kwargs: object) -> dict:
    return stack.app.send_task(EMBED_TASK, kwargs=kwargs, queue=EMBED_QUEUE).get(timeout=60)


def _reference(encoder_dir: Path, images: list[bytes], **kwargs: object) -> np.ndarray:
    embedder = Embedder.load(encoder_dir)
    t = EvalTransform(embedder.config["image_size"], tuple(embedder.config["mean"]), tuple(embedder.config["std"]))
    batch = torch.stack([t(decode_image(b, f"img{i}")) for i, b in enumerate(images)])
    return embedder.embed_tensors(batch, **kwargs).numpy()  # type: ignore[arg-type]


def test_embed_matches_the_library_on_the_exported_encoder(worker: Stack, trained: str,
                                                            digits: dict[str, Path]) -> None:
    images = _images(digits["test"], 70)  # more than one batch of 64
    answer = _embed(worker, job_id=trained, checkpoint_id=None,
                    images_b64=[base64.b64encode(b).decode() for b in images], pooling="mean",
                    layer=None, normalize=False)
    got = np.array(answer["embeddings"], dtype=np.float32)
    assert got.shape == (70, 48) and answer["dim"] == 48
    assert answer["model"] == "vit_tiny_patch16_224" and answer["checkpoint_id"] is None
    expected = _reference(worker.artifacts / f"jobs/{trained}/encoder", images)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_embed_options_and_a_specific_checkpoint(worker: Stack, trained: str, digits: dict[str, Path]) -> None:
    images = _images(digits["test"], 3)
    b64 = [base64.b64encode(b).decode() for b in images]
    encoder_dir = worker.artifacts / f"jobs/{trained}/encoder"
    cls = _embed(worker, job_id=trained, images_b64=b64, pooling="cls", normalize=True)
    np.testing.assert_allclose(np.array(cls["embeddings"]), _reference(encoder_dir, images, pooling="cls",
                                                                        normalize=True), atol=1e-4)
    layer0 = _embed(worker, job_id=trained, images_b64=b64, layer=0)
    np.testing.assert_allclose(np.array(layer0["embeddings"]), _reference(encoder_dir, images, layer=0), atol=1e-4)

    records = worker.read(lambda s: repo.list_checkpoints(s, job_id=trained))
    final = next(c for c in records if c.kind == "checkpoint" and c.final)
    first = next(c for c in records if c.kind == "checkpoint" and c.step == 2)
    at_final = _embed(worker, job_id=trained, checkpoint_id=final.id, images_b64=b64)
    np.testing.assert_allclose(np.array(at_final["embeddings"]), _reference(encoder_dir, images), atol=1e-4)
    at_two = _embed(worker, job_id=trained, checkpoint_id=first.id, images_b64=b64)
    assert at_two["checkpoint_id"] == first.id
    assert not np.allclose(np.array(at_two["embeddings"]), np.array(at_final["embeddings"]), atol=1e-4)


def _png(size: tuple[int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"images_b64": ["%%% not base64 %%%"]}, "images[0]: not valid base64"),
    ({"images_b64": [_png((8, 8)), base64.b64encode(b"hello, not an image").decode()]}, "images[1]"),
    ({"images_b64": [_png((8, 8))], "checkpoint_id": "ckpt_nope"}, "does not exist"),
    ({"images_b64": [_png((8, 8))], "layer": 7}, "out of range"),
    ({"images_b64": [_png((8, 8))], "pooling": "max"}, "pooling must be one of"),
    ({"images_b64": []}, "send between 1 and"),
])
def test_embed_refuses_bad_input_with_value_error(worker: Stack, trained: str, kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        _embed(worker, job_id=trained, **kwargs)


def test_embed_dataset_writes_embeddings_and_file_list(worker: Stack, trained: str,
                                                       digits: dict[str, Path]) -> None:
    dataset = digits["test"]
    with worker.sessions.begin() as s:
        run_id = repo.create_embedding_run(s, job_id=trained, dataset=str(dataset),
                                           options={"pooling": "mean", "layer": None, "normalize": False}).id
    result = worker.app.send_task(EMBED_DATASET_TASK, args=[trained, run_id], queue=EMBED_QUEUE)
    assert result.get(timeout=120) == "succeeded"

    run = worker.read(lambda s: repo.get_embedding_run(s, job_id=trained, run_id=run_id))
    assert run is not None and run.status == JobStatus.SUCCEEDED and run.finished_at is not None
    source = open_source(dataset)
    names = [source.name(i) for i in range(len(source))]
    assert run.count == len(names) and run.failed == []
    assert run.embeddings_key == f"jobs/{trained}/embeddings/{run_id}/embeddings.npy"
    vectors = np.load(worker.artifacts / run.embeddings_key)
    files = (worker.artifacts / (run.files_key or "")).read_text().splitlines()
    assert vectors.shape == (len(names), 48) and vectors.dtype == np.float32
    assert files == names
    expected = _reference(worker.artifacts / f"jobs/{trained}/encoder", [source.read_bytes(i) for i in range(3)])
    np.testing.assert_allclose(vectors[:3], expected, atol=1e-4)
    assert result.get(timeout=1) == "succeeded"
    # Re-delivery of a finished run is a no-op.
    again = worker.app.send_task(EMBED_DATASET_TASK, args=[trained, run_id], queue=EMBED_QUEUE)
    assert again.get(timeout=60) == "skipped"


def test_embed_dataset_of_a_missing_folder_fails_the_run(worker: Stack, trained: str, tmp_path: Path) -> None:
    with worker.sessions.begin() as s:
        run_id = repo.create_embedding_run(s, job_id=trained, dataset=str(tmp_path / "gone"), options={}).id
    assert worker.app.send_task(EMBED_DATASET_TASK, args=[trained, run_id], queue=EMBED_QUEUE).get(timeout=60) == "failed"
    run = worker.read(lambda s: repo.get_embedding_run(s, job_id=trained, run_id=run_id))
    assert run is not None and run.status == JobStatus.FAILED and "does not exist" in (run.error_message or "")
