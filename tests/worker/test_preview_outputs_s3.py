"""Previews and TensorBoard events reach an S3 artifact store (moto) and are listed from it."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

import api.services.previews as service
from api.services.previews import png_size, preview_png
from simmim_service.artifacts import ArtifactStore
from tests.s3 import S3, s3_server
from worker.outputs import JobOutputs


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with s3_server() as server:
        yield server


def test_previews_and_events_are_uploaded_and_listed(s3: S3, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:

    bucket = s3.new_bucket()
    store = ArtifactStore(f"s3://{bucket}/svc", s3.storage_options)
    outputs = JobOutputs(store, "job_x", tmp_path / "work")
    previews = outputs.directory / "previews"
    previews.mkdir(parents=True)
    png = io.BytesIO()
    Image.new("RGB", (138, 274), (1, 2, 3)).save(png, format="PNG")
    (previews / "step_00000004.png").write_bytes(png.getvalue())
    events = outputs.directory / "tensorboard"
    events.mkdir()
    (events / "events.out.tfevents.1.host.0").write_bytes(b"event bytes")

    assert outputs.publish_preview(4) == "jobs/job_x/previews/step_00000004.png"
    assert outputs.publish_preview(8) is None  # no preview at that step (previews off): nothing to do
    assert outputs.publish_tensorboard() == ["jobs/job_x/tensorboard/events.out.tfevents.1.host.0"]
    assert s3.keys(bucket) == ["svc/jobs/job_x/previews/step_00000004.png",
                               "svc/jobs/job_x/tensorboard/events.out.tfevents.1.host.0"]
    assert store.list("jobs/job_x/previews") == ["jobs/job_x/previews/step_00000004.png"]
    assert png_size(store, "jobs/job_x/previews/step_00000004.png") == (138, 274)
    assert png_size(store, "jobs/job_x/previews/step_00000008.png") is None

    monkeypatch.setattr(service, "get_job", lambda **kwargs: None)  # the job lookup is the API tests' part
    data = preview_png(session=None, artifacts=store, tenant="t", job_id="job_x",  # type: ignore[arg-type]
                       name="step_00000004.png")
    assert data == png.getvalue()


def test_a_failing_upload_is_logged_and_never_fails_the_job(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = ArtifactStore("s3://no-such-bucket/svc", {"endpoint_url": "http://127.0.0.1:1", "key": "k", "secret": "s",
                                                      "client_kwargs": {"region_name": "us-east-1"},
                                                      "config_kwargs": {"retries": {"max_attempts": 1},
                                                                        "connect_timeout": 1}})
    outputs = JobOutputs(store, "job_y", tmp_path / "work")
    (outputs.directory / "previews").mkdir(parents=True)
    (outputs.directory / "previews" / "step_00000002.png").write_bytes(b"png")
    (outputs.directory / "tensorboard").mkdir()
    (outputs.directory / "tensorboard" / "events.out.tfevents.x").write_bytes(b"e")
    assert outputs.publish_preview(2) is None
    assert outputs.publish_tensorboard() == []
    assert "could not upload the preview step_00000002.png" in caplog.text
    assert "could not upload the TensorBoard events" in caplog.text
