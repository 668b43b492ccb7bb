"""A worker reports progress by time (SIMMIM_PROGRESS_INTERVAL_S), not by step.

Every report reads the loss back from the device; a job that reported every step would make
each step wait for the GPU. The store only keeps a report every interval anyway.
"""

from __future__ import annotations

import json
from pathlib import Path

from jobstore import repo
from jobstore.states import JobStatus
from simmim.metrics_log import read_metrics
from tests.worker.stack import Stack, celery_worker


def test_a_job_reports_about_once_an_interval_and_always_at_the_end(stack: Stack, digits: dict[str, Path]) -> None:
    job_id = stack.create_job(digits["train"], max_steps=40, checkpoint_every=1000)
    with celery_worker(stack, "cadence", env={"SIMMIM_PROGRESS_INTERVAL_S": "0.5"}):
        assert stack.submit(job_id).get(timeout=180) == "succeeded"
    job = stack.job(job_id)
    assert job.status == JobStatus.SUCCEEDED and job.progress["step"] == 40
    config = json.loads((stack.artifacts / f"jobs/{job_id}/config.json").read_text())
    assert config["run"]["log_interval_s"] == 0.5 and config["run"]["log_every"] >= 40
    reported = [p["step"] for p in read_metrics(stack.artifacts / f"jobs/{job_id}/metrics.jsonl", "loss")]
    assert reported[-1] == 40 and len(reported) <= 20, reported  # 40 tiny steps take a few seconds, not 10+
    stored = [p.step for p in stack.read(lambda s: repo.metric_history(s, job_id=job_id, key="loss"))]
    assert stored[-1] == 40 and set(stored) <= set(reported)
