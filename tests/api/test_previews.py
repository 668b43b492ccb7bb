"""Reconstruction previews and metric plots over real HTTP: listing, PNG bytes, caching, 404/422, tenants."""

from __future__ import annotations

import io
import math

import httpx
from PIL import Image

from jobstore.states import JobStatus
from simmim_service.client import SimMIMClient
from tests.api.conftest import ALICE, LiveApi, assert_problem
from tests.api.store import report, seed_job


def _png(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, format="PNG")
    return out.getvalue()


def _write(api: LiveApi, key: str, data: bytes) -> None:
    path = api.artifacts.local_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_previews_are_listed_oldest_first_and_served_as_png(api: LiveApi, alice: httpx.Client) -> None:
    job_id = seed_job(api.sessions, status=JobStatus.RUNNING)
    assert alice.get(f"/v1/jobs/{job_id}/previews").json() == {"data": []}  # before the first checkpoint

    grids = {20: _png(138, 274, (10, 20, 30)), 10: _png(138, 274, (40, 50, 60)), 100: _png(70, 40, (1, 2, 3))}
    for step, data in grids.items():
        _write(api, f"jobs/{job_id}/previews/step_{step:08d}.png", data)
    _write(api, f"jobs/{job_id}/previews/.tmp-step_00000030.png", b"half a file")  # an atomic write under way
    _write(api, f"jobs/{job_id}/previews/notes.txt", b"not a preview")
    _write(api, f"jobs/{job_id}/previews/step_00000040.png", b"not a png at all, though named like one")

    listed = alice.get(f"/v1/jobs/{job_id}/previews")
    assert listed.status_code == 200
    assert listed.json()["data"] == [
        {"name": f"step_{s:08d}.png", "step": s, "width": w, "height": h,
         "url": f"/v1/jobs/{job_id}/previews/step_{s:08d}.png"}
        for s, w, h in [(10, 138, 274), (20, 138, 274), (100, 70, 40)]]

    for item in listed.json()["data"]:
        r = alice.get(item["url"])
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.content == grids[item["step"]]
        image = Image.open(io.BytesIO(r.content))
        assert (image.format, image.size) == ("PNG", (item["width"], item["height"]))
        assert "immutable" in r.headers["cache-control"] and r.headers["etag"].startswith('"')
        assert r.headers["content-disposition"] == f'inline; filename="{item["name"]}"'
        again = alice.get(item["url"], headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304 and again.content == b""


def test_unknown_and_malformed_preview_names(api: LiveApi, alice: httpx.Client) -> None:
    job_id = seed_job(api.sessions, status=JobStatus.RUNNING)
    _write(api, f"jobs/{job_id}/previews/step_00000010.png", _png(8, 8, (0, 0, 0)))
    _write(api, f"jobs/{job_id}/spec.json", b"{}")
    base = f"/v1/jobs/{job_id}/previews"
    assert_problem(alice.get(f"{base}/step_00000011.png"), 404, "no preview", "step_00000011.png")
    assert_problem(alice.get(f"{base}/step_00000040.png.tmp"), 422, "path.name")
    for hostile in ("..%2Fspec.json", "%2E%2E%2F..%2Fspec.json", "step_0000001.png", "STEP_00000010.PNG"):
        r = alice.get(f"{base}/{hostile}")
        assert r.status_code in (404, 422), (hostile, r.status_code)
        assert r.headers["content-type"].startswith("application/problem+json"), hostile
    _write(api, f"jobs/{job_id}/previews/step_00000050.png", b"GIF89a not a png")
    assert_problem(alice.get(f"{base}/step_00000050.png"), 404)
    assert_problem(alice.get("/v1/jobs/job_00000000000000000000/previews"), 404)
    assert_problem(alice.get("/v1/jobs/job_00000000000000000000/previews/step_00000010.png"), 404)


def test_plot_has_one_panel_per_metric(api: LiveApi, alice: httpx.Client) -> None:
    job_id = seed_job(api.sessions, status=JobStatus.RUNNING)
    attempt = 1
    for step in range(1, 41):
        report(api.sessions, job_id, attempt, step, loss=1.0 / math.sqrt(step), lr=1e-4 * min(1.0, step / 5),
               images_per_sec=100.0 + step, custom_acc=step / 40)
    r = alice.get(f"/v1/jobs/{job_id}/plot.png", params={"keys": "loss,lr,images_per_sec", "width": 640,
                                                          "height": 600})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    image = Image.open(io.BytesIO(r.content))
    assert (image.format, image.size, image.mode) == ("PNG", (640, 600), "RGB")
    pixels = image.load()
    coloured = [sum(1 for x in range(640) if len(set(pixels[x, y])) > 1)  # any non-grey pixel in the row
                for y in range(600)]
    panels = [sum(coloured[i * 200:(i + 1) * 200]) for i in range(3)]
    assert all(n > 50 for n in panels), panels  # a line in each third

    default = alice.get(f"/v1/jobs/{job_id}/plot.png")
    assert Image.open(io.BytesIO(default.content)).size == (900, 3 * 220)  # loss, lr, images_per_sec
    reported = alice.get(f"/v1/jobs/{job_id}/plot.png", params={"keys": "custom_acc, loss,custom_acc"})
    assert Image.open(io.BytesIO(reported.content)).size == (900, 2 * 220)  # duplicates dropped
    fresh = seed_job(api.sessions, status=JobStatus.QUEUED)  # nothing reported yet: empty panels
    assert alice.get(f"/v1/jobs/{fresh}/plot.png", params={"keys": "loss,data_wait_fraction"}).status_code == 200


def test_plot_refuses_unknown_keys_and_absurd_sizes(api: LiveApi, alice: httpx.Client) -> None:
    job_id = seed_job(api.sessions, status=JobStatus.RUNNING)
    url = f"/v1/jobs/{job_id}/plot.png"
    assert_problem(alice.get(url, params={"keys": "loss,accuracy"}), 422, "query.keys", "'accuracy'")
    assert_problem(alice.get(url, params={"keys": " , "}), 422, "query.keys", "at least one metric")
    assert_problem(alice.get(url, params={"width": 100000}), 422, "query.width")
    assert_problem(alice.get(url, params={"width": 5}), 422, "query.width")
    assert_problem(alice.get(url, params={"height": -1}), 422, "query.height")
    assert_problem(alice.get(url, params={"keys": "loss,lr,images_per_sec", "height": 100}), 422,
                   "query.height", "80 px each")
    assert_problem(alice.get("/v1/jobs/job_00000000000000000000/plot.png"), 404)


def test_other_tenants_see_no_previews_or_plots(api: LiveApi, alice: httpx.Client, bob: httpx.Client) -> None:
    job_id = seed_job(api.sessions, status=JobStatus.RUNNING)
    _write(api, f"jobs/{job_id}/previews/step_00000010.png", _png(8, 8, (0, 0, 0)))
    for path in ("previews", "previews/step_00000010.png", "plot.png"):
        assert alice.get(f"/v1/jobs/{job_id}/{path}").status_code == 200, path
        assert_problem(bob.get(f"/v1/jobs/{job_id}/{path}"), 404, job_id)
        assert_problem(api.client(None).get(f"/v1/jobs/{job_id}/{path}"), 401)


def test_python_client(api: LiveApi) -> None:
    job_id = seed_job(api.sessions, status=JobStatus.RUNNING)
    report(api.sessions, job_id, 1, 1, loss=0.5, lr=1e-4, images_per_sec=10.0)
    data = _png(16, 12, (9, 9, 9))
    _write(api, f"jobs/{job_id}/previews/step_00000001.png", data)
    with SimMIMClient(api.url, api_key=ALICE) as client:
        (item,) = client.previews(job_id)
        assert item["name"] == "step_00000001.png" and (item["width"], item["height"]) == (16, 12)
        assert client.preview(job_id, item["name"]) == data
        assert Image.open(io.BytesIO(client.plot(job_id, ["loss", "lr"], width=400))).size == (400, 440)
