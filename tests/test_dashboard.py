"""The dashboard in a real browser (headless Chromium via Playwright) against the embedded service.

``simmim-service serve --embedded`` runs with an API key, so the page must ask for it; real
jobs train on real digits while the page watches them. Screenshots go to the test's tmp dir
and to ``test-artifacts/dashboard/`` (kept by CI). Chromium is Debian's ``chromium`` package
(``.ci/run`` installs it); Playwright drives it, no browser download.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from simmim_service.client import SimMIMClient
from tests.services import alive, free_port, unavailable, wait_until_ready
from tests.worker.stack import TINY_TRAINING

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
KEY = "dashboard-key-0123456789"
CHROMIUM = os.environ.get("SIMMIM_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.slow

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, LocatorAssertions, Page


def expect(locator: Locator) -> LocatorAssertions:
    """Playwright's retrying assertions (imported late: without playwright the module skips, not errors)."""
    from playwright.sync_api import expect as playwright_expect
    playwright_expect.set_options(timeout=30_000)  # the CI box has 2 loaded cores, not 5 s of patience
    return playwright_expect(locator)


@dataclass
class Service:
    url: str
    client: SimMIMClient
    data_dir: Path
    shots: Path


def _snap(service: Service, page: Page, name: str) -> Path:
    path = service.shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, ARTIFACTS / path.name)
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the playwright Python package is not installed (pip install -e '.[dev]')")
    if not Path(CHROMIUM).exists():
        unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, digits: dict[str, Path]) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("dashboard")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SIMMIM_API_KEYS": json.dumps({KEY: "dash"}),
           "SIMMIM_ALLOWED_ROOTS": json.dumps([str(digits["train"].parent)]), "SIMMIM_PROGRESS_INTERVAL_S": "0"}
    log = (tmp / "serve.log").open("wb")
    data_dir = tmp / "service"
    proc = subprocess.Popen([sys.executable, "-m", "simmim_service.cli", "serve", "--embedded", "--port", str(port),
                             "--data-dir", str(data_dir)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    shots = tmp / "screenshots"
    shots.mkdir()
    try:
        wait_until_ready(url, proc, tmp / "serve.log")
        with SimMIMClient(url, api_key=KEY) as client:
            yield Service(url, client, data_dir, shots)
    finally:
        started = _descendants(proc.pid)
        proc.terminate()
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # a worker stuck in its own shutdown: not what this test is about
            stuck = [pid for pid in started if alive(pid)]
            warnings.warn(f"embedded worker processes {stuck} did not stop within 60 s of SIGTERM; killed them",
                          stacklevel=1)
            for pid in stuck:
                os.kill(pid, signal.SIGKILL)
            code = proc.wait(timeout=60)
        for pid in started:  # never leave a process of this test behind
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        log.close()
        assert code == 0, (tmp / "serve.log").read_text()[-3000:]


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    children = [int(p) for p in out.split()]
    return [pid for child in children for pid in (child, *_descendants(child))]



@pytest.fixture(scope="module")
def finished_job(service: Service, digits: dict[str, Path]) -> dict[str, Any]:
    """A short job that has succeeded (checkpoints every 4 steps, each with a preview)."""
    job = service.client.create_job({"name": "dash-done", "dataset": str(digits["train"]),
                                     "training": {**TINY_TRAINING, "max_steps": 12}})
    job = service.client.wait(job["id"], timeout=240, poll=0.3)
    assert job["status"] == "succeeded", job
    return job


@pytest.fixture
def page(browser: Browser, service: Service) -> Iterator[Page]:
    """A fresh browser context (empty localStorage) that has given the key at the prompt."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(service.url + "/")
    page.locator("#key-view").wait_for(state="visible")
    page.fill("#key-input", KEY)
    page.click("#key-form button[type=submit]")
    page.locator("#jobs-view").wait_for(state="visible")
    try:
        yield page
    finally:
        context.close()
    assert not [u for u in urls if KEY in u], "the API key appeared in a URL"
    assert errors == [], errors


def test_page_asks_for_the_key_and_lists_real_jobs(page: Page, service: Service,
                                                    finished_job: dict[str, Any]) -> None:
    row = page.locator(f'tr[data-job-id="{finished_job["id"]}"]')
    row.wait_for()
    assert row.get_attribute("data-status") == "succeeded"
    expect(row.locator(".job-progress")).to_contain_text("12 / 12")
    _snap(service, page, "01_jobs_list")
    assert page.evaluate("localStorage.getItem('simmim.apiKey')") == KEY
    page.click("#forget-key")
    page.locator("#key-view").wait_for(state="visible")
    assert page.evaluate("localStorage.getItem('simmim.apiKey')") is None


def test_live_progress_moves_and_the_cancel_button_cancels(page: Page, service: Service,
                                                           digits: dict[str, Path],
                                                           finished_job: dict[str, Any]) -> None:
    job = service.client.create_job({"name": "dash-live", "dataset": str(digits["train"]),
                                     "training": {**TINY_TRAINING, "max_steps": 20000, "checkpoint_every": 1000}})
    page.locator(f'tr[data-job-id="{job["id"]}"]').wait_for()  # the list refreshes by itself
    page.click(f'tr[data-job-id="{job["id"]}"] a')
    page.locator("#job-view").wait_for(state="visible")
    step = page.locator("#job-progress-text")
    page.wait_for_function("() => Number(document.querySelector('#job-progress-text').dataset.step) >= 2",
                           timeout=120_000)
    first = int(step.get_attribute("data-step") or 0)
    page.wait_for_function(f"() => Number(document.querySelector('#job-progress-text').dataset.step) > {first + 3}",
                           timeout=60_000)
    expect(page.locator("#job-status")).to_have_text("running")
    page.wait_for_function("() => Number(document.querySelector('#loss-canvas').dataset.points) >= 2")
    assert page.locator('#events li[data-type="metrics"]').count() >= 2  # from the live stream
    _snap(service, page, "02_job_running")
    page.click("#cancel-btn")
    page.wait_for_function("() => document.querySelector('#job-status').textContent === 'cancelled'",
                           timeout=60_000)
    assert page.locator("#cancel-btn").is_hidden()
    final = service.client.get_job(job["id"])
    assert final["status"] == "cancelled" and final["progress"]["step"] < 20000
    _snap(service, page, "03_job_cancelled")


def test_finished_job_shows_checkpoints_downloads_and_neighbours(page: Page, service: Service,
                                                                  digits: dict[str, Path],
                                                                  finished_job: dict[str, Any]) -> None:
    page.goto(f"{service.url}/#/jobs/{finished_job['id']}")
    page.locator("#job-view").wait_for(state="visible")
    # the view shows before its first fetch answers: wait for the data, never read a half-drawn page
    expect(page.locator("#job-status")).to_have_text("succeeded")
    expect(page.locator("#job-progress-text")).to_have_attribute("data-step", "12")
    page.locator('#events li[data-type="status"]', has_text="succeeded").wait_for()  # the stream replayed it all
    expect(page.locator("#loss-canvas")).to_have_attribute("data-points", "12")  # history + stream, no duplicates
    rows = page.locator("#checkpoints-table tbody tr")
    rows.first.wait_for()
    encoder = next(c for c in service.client.checkpoints(finished_job["id"]) if c["kind"] == "encoder")
    with page.expect_download() as download:
        page.click(f'tr[data-checkpoint-id="{encoder["id"]}"] button.download')
    saved = Path(download.value.path())
    assert saved.stat().st_size == encoder["size"]
    assert download.value.suggested_filename.endswith(".safetensors")

    sample = sorted(digits["test"].rglob("*.png"))[0]
    page.set_input_files("#neighbours-input", str(sample))
    page.locator("#embed-run-btn").wait_for(state="visible")  # no embedding run yet: offer one
    page.click("#embed-run-btn")
    thumbs = page.locator("#neighbours-results .neighbour img")
    thumbs.first.wait_for(timeout=180_000)
    assert thumbs.count() == 5
    page.wait_for_function("() => [...document.querySelectorAll('#neighbours-results .neighbour img')]"
                           ".every(img => img.complete && img.naturalWidth > 0)")
    assert page.locator("#neighbours-results .query").count() == 1
    _snap(service, page, "04_neighbours")


def test_a_preview_image_and_the_plot_load(page: Page, service: Service, finished_job: dict[str, Any]) -> None:
    page.goto(f"{service.url}/#/jobs/{finished_job['id']}")
    page.locator("#job-view").wait_for(state="visible")
    page.wait_for_function("() => { const img = document.querySelector('#previews img');"
                           " return img && img.complete && img.naturalWidth > 0 }", timeout=30_000)
    page.wait_for_function("() => { const img = document.querySelector('#plot-img');"
                           " return img.complete && img.naturalWidth > 0 }", timeout=30_000)
    page.locator("#previews img").first.scroll_into_view_if_needed()
    _snap(service, page, "05_previews")
