"""Checkpoint listing and resumable, verifiable downloads (Range, ETag, If-None-Match, If-Range)."""

from __future__ import annotations

import hashlib

import httpx

from jobstore.states import JobStatus
from tests.api.conftest import LiveApi, assert_problem
from tests.api.store import seed_checkpoint, seed_job


def test_list_checkpoints_with_download_links(api: LiveApi, alice: httpx.Client) -> None:
    job_id = seed_job(api.sessions, status=JobStatus.RUNNING)
    first, _ = seed_checkpoint(api.sessions, api.artifacts, job_id, step=100, size=10)
    final, data = seed_checkpoint(api.sessions, api.artifacts, job_id, step=200, size=20, final=True)
    listed = alice.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
    assert [(c["id"], c["step"], c["final"], c["kind"], c["size"]) for c in listed] == [
        (first, 100, False, "checkpoint", 10), (final, 200, True, "checkpoint", 20)]
    assert listed[1]["sha256"] == hashlib.sha256(data).hexdigest()
    assert listed[1]["download_url"] == f"/v1/jobs/{job_id}/checkpoints/{final}/content"


def test_download_streams_the_whole_file_with_its_checksum(api: LiveApi, alice: httpx.Client) -> None:
    job_id = seed_job(api.sessions, status=JobStatus.SUCCEEDED)
    _, data = seed_checkpoint(api.sessions, api.artifacts, job_id, size=3 * (1 << 20) + 17)
    url = alice.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"][0]["download_url"]
    digest, received = hashlib.sha256(), 0
    with alice.stream("GET", url) as r:
        assert r.status_code == 200
        for chunk in r.iter_bytes():
            digest.update(chunk)
            received += len(chunk)
        headers = r.headers
    assert received == len(data) == int(headers["content-length"])
    assert digest.hexdigest() == headers["x-checksum-sha256"] == headers["etag"].strip('"')
    assert headers["accept-ranges"] == "bytes" and "ckpt_00000100.pt" in headers["content-disposition"]


def test_ranges_resume_a_download(api: LiveApi, alice: httpx.Client) -> None:
    job_id = seed_job(api.sessions, status=JobStatus.SUCCEEDED)
    ckpt, data = seed_checkpoint(api.sessions, api.artifacts, job_id, size=5000)
    url = f"/v1/jobs/{job_id}/checkpoints/{ckpt}/content"
    for header, expected, content_range in [
        ("bytes=0-99", data[:100], "bytes 0-99/5000"),
        ("bytes=4000-", data[4000:], "bytes 4000-4999/5000"),
        ("bytes=-10", data[-10:], "bytes 4990-4999/5000"),
        ("bytes=4990-9999", data[4990:], "bytes 4990-4999/5000"),
    ]:
        r = alice.get(url, headers={"Range": header})
        assert r.status_code == 206, header
        assert r.content == expected and r.headers["content-range"] == content_range
        assert int(r.headers["content-length"]) == len(expected)
    # a download cut at 1234 bytes resumes to the exact file
    resumed = data[:1234] + alice.get(url, headers={"Range": "bytes=1234-"}).content
    assert hashlib.sha256(resumed).hexdigest() == hashlib.sha256(data).hexdigest()
    assert alice.get(url, headers={"Range": "bytes=0-1,5-6"}).status_code == 200  # multi-range: whole file
    assert_problem(alice.get(url, headers={"Range": "bytes=-0"}), 416)
    assert_problem(alice.get(url, headers={"Range": "bytes=30-20"}), 416)


def test_etag_conditionals(api: LiveApi, alice: httpx.Client) -> None:
    job_id = seed_job(api.sessions, status=JobStatus.SUCCEEDED)
    ckpt, data = seed_checkpoint(api.sessions, api.artifacts, job_id, size=2000)
    url = f"/v1/jobs/{job_id}/checkpoints/{ckpt}/content"
    etag = alice.get(url).headers["etag"]
    not_modified = alice.get(url, headers={"If-None-Match": etag})
    assert not_modified.status_code == 304 and not_modified.content == b"" and not_modified.headers["etag"] == etag
    assert alice.get(url, headers={"If-None-Match": f'"other", W/{etag}'}).status_code == 304
    assert alice.get(url, headers={"If-None-Match": '"other"'}).status_code == 200
    assert alice.get(url, headers={"Range": "bytes=0-9", "If-Range": etag}).status_code == 206
    stale = alice.get(url, headers={"Range": "bytes=0-9", "If-Range": '"stale"'})
    assert stale.status_code == 200 and stale.content == data


def test_pruned_checkpoint_is_gone_and_other_tenants_see_nothing(api: LiveApi, alice: httpx.Client,
                                                                  bob: httpx.Client) -> None:
    job_id = seed_job(api.sessions, status=JobStatus.SUCCEEDED)
    ckpt, _ = seed_checkpoint(api.sessions, api.artifacts, job_id, size=10)
    url = f"/v1/jobs/{job_id}/checkpoints/{ckpt}/content"
    assert_problem(bob.get(url), 404)
    assert_problem(bob.get(f"/v1/jobs/{job_id}/checkpoints"), 404)
    api.artifacts.local_path(f"jobs/{job_id}/checkpoints/ckpt_00000100.pt").unlink()
    assert_problem(alice.get(url), 410, "keep_last")
