"""The dashboard's files: served without a key (the data behind them needs one), locked down by CSP."""

from __future__ import annotations

from tests.api.conftest import LiveApi


def test_page_and_its_files_are_served_and_nothing_else(api: LiveApi) -> None:
    anonymous = api.client(None)
    page = anonymous.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing loaded from elsewhere
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    script = anonymous.get("/static/app.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert "Authorization" in script.text and "EventSource" not in script.text.replace("EventSource cannot", "")
    assert anonymous.get("/static/app.css").headers["content-type"].startswith("text/css")
    for path in ("/static/index.html", "/static/..%2fdashboard.py", "/static/../main.py", "/static/"):
        assert anonymous.get(path).status_code == 404, path
    assert anonymous.get("/v1/jobs").status_code == 401  # the page is public, the data is not
    paths = anonymous.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not [p for p in paths if p.startswith("/static")]


def test_dashboard_redirects_to_the_page(api: LiveApi) -> None:
    response = api.client(None).get("/dashboard")
    assert response.status_code == 307 and response.headers["location"] == "/"
