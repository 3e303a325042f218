"""The dashboard in headless Chromium (Debian's package, driven by Playwright): log in, watch, kill.

Skipped, saying why, when /usr/bin/chromium or the playwright package is missing (CI installs
both: ``apt-get install chromium`` and ``pip install playwright``; never ``playwright install``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.cluster_harness import NodeSpec, jobs_function, write_job

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update"]

pytestmark = [
    pytest.mark.slow,
    # a test took 40-51 s in full runs under load (18 s quiet), and its own waits add up to
    # more than the 120 s default: a slower CI would be stopped by pytest, not by a wait
    pytest.mark.timeout(240),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed"),
]


def _login_link(cluster) -> str:
    return cluster.wait_for(
        lambda: re.search(r"dashboard: (http://\S+/login\?token=\S+)", cluster.server.log_text()),
        10,
        "the server's login link",
    ).group(1)


def _progress(page, job: int) -> int:
    text = page.locator(f'tr[data-job="{job}"] .progress-text span').first.inner_text()
    return int(text.split("/")[0].replace(",", "").strip())


def _cross_site_form_cannot_kill(context, link: str, job: int, tmp_path: Path) -> None:
    """Another origin's page auto-submits a form at the kill URL, in the logged-in browser."""
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    base = link.split("/login")[0]
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "index.html").write_text(
        f'<form method="POST" action="{base}/api/v1/jobs/{job}/kill" enctype="text/plain">'
        "<input name='{\"x\":\"' value='\"}'></form>"
        "<script>document.forms[0].submit()</script>"
    )
    handler = partial(SimpleHTTPRequestHandler, directory=str(evil))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        attacker = context.new_page()
        with attacker.expect_response(lambda r: "/kill" in r.url, timeout=15_000) as answer:
            attacker.goto(f"http://127.0.0.1:{server.server_address[1]}/index.html")
        assert answer.value.status == 403  # the session cookie went along; the CSRF check held
        attacker.close()
    finally:
        server.shutdown()
        server.server_close()


def test_log_in_watch_a_job_and_kill_it(make_cluster, tmp_path: Path) -> None:
    """Log in through the printed link, see two nodes and the job's progress move with no error
    in the browser's console; a form on another origin cannot kill the job; kill it with the
    button (confirming), see it marked killed; save screenshots of the page."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    cluster = make_cluster(
        [NodeSpec(cores=1), NodeSpec(cores=1)], server_env={"REMAP_HTTP_PORT": "0"}
    )
    link = _login_link(cluster)
    job_file = write_job(
        tmp_path / "slow.yaml",
        {"function": jobs_function("funcs", "slow"), "args_range": [0, 4000], "chunksize": 1},
        name="slow squares",
    )
    # 4000 calls of 0.3 s on two cores: 10 minutes, so the job is still running when the
    # browser kills it on a machine however loaded (400 calls lasted 60 s; the test took 51 s)
    console = cluster.console_popen("compute", str(job_file), "--quiet")
    job = cluster.wait_for(
        lambda: next((j["id"] for j in cluster.status()["jobs"] if j["state"] == "running"), None),
        20,
        "the job to start",
    )
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            page = context.new_page()
            errors: list[str] = []  # the browser's console: a failed load (a 404) is one
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(link)
            assert page.url.endswith("/")  # the login redirected to the dashboard
            page.wait_for_selector(".node >> nth=1", timeout=15_000)
            assert page.locator(".node").count() == 2
            row = page.locator(f'tr[data-job="{job}"]')
            row.wait_for(timeout=15_000)
            first = _progress(page, job)
            page.wait_for_function(
                f"""() => {{
                    const s = document.querySelector('tr[data-job="{job}"] .progress-text span');
                    return s && parseInt(s.textContent.replace(/,/g, '')) > {first};
                }}""",
                timeout=20_000,
            )
            page.screenshot(path=str(tmp_path / "dashboard-running.png"), full_page=True)
            assert errors == []  # no /favicon.ico 404 either
            _cross_site_form_cannot_kill(context, link, job, tmp_path)
            assert cluster.job(job)["state"] == "running"
            row.locator('button[data-action="kill"]').click()
            page.locator("#confirm-ok").click()
            row.locator(".badge.killed").wait_for(timeout=15_000)
            page.screenshot(path=str(tmp_path / "dashboard-killed.png"), full_page=True)
            assert page.locator("#jobs-body tr").count() >= 1
            assert "slow squares" in page.locator("#jobs").inner_text()
        finally:
            browser.close()
    assert (tmp_path / "dashboard-killed.png").stat().st_size > 10_000
    done = cluster.finish(console, timeout=30)
    assert done.returncode != 0 and "killed" in done.stderr, cluster.explain(done)
    assert cluster.job(job)["state"] == "killed"


def test_a_detached_data_job_on_the_dashboard(make_cluster, tmp_path: Path) -> None:
    """A detached data job's row says its kind and phase; its Kill button ends it INCOMPLETE."""
    from remap.data import layout
    from remap.data.layout import DataDir
    from tests.test_detached_file_jobs import _slow_job

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    data = DataDir(tmp_path / "data")
    cluster = make_cluster(
        [NodeSpec(cores=2)],
        env={"REMAP_DATA_DIR": str(data.root)},
        server_env={"REMAP_HTTP_PORT": "0"},
    )
    link = _login_link(cluster)
    # its map phase must outlast Chromium's start and the page's first rows: 150 s of map,
    # not the 15 s of the default (a browser test took 51 s under load; it is killed anyway)
    job, data_job = _slow_job(cluster, tmp_path, data, lines=6000)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            page.goto(link)
            row = page.locator(f'tr[data-job="{job}"]')
            row.wait_for(timeout=15_000)
            assert "mapreduce (detached)" in row.inner_text()
            assert row.locator(".progress-text span").first.inner_text().startswith("map · ")
            row.locator('button[data-action="kill"]').click()
            page.locator("#confirm-ok").click()
            row.locator(".badge.killed").wait_for(timeout=30_000)
        finally:
            browser.close()
    assert layout.read_result(data, data_job) == "INCOMPLETE"
