"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright's Python package.

Against the app served by uvicorn on a loopback port and a real MLflow + S3 stack: open the home
page, filter by a reason, open a version, press re-run (refused without credentials, accepted after
signing in with the operator token) and see the new attempt appear. A screenshot of the home page is
kept in test-artifacts/ for a person to look at.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckpt_stage.config import Settings
from ckpt_stage.dashboard.app import create_app
from tests.integration.dashboard_seed import Seeded, seed_once, serve, stack_env

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
# docs/traps.md "Browser tests": `playwright install` cannot download browsers here; use Debian's.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
TOKEN = "browser-test-token"


@pytest.fixture(scope="module")
def seeded(stack, tmp_path_factory) -> Iterator[Seeded]:
    if stack.backend != "sqlite":
        pytest.skip("the browser test runs once, on the SQLite stack; the API tests cover every backend")
    with stack_env(stack, tmp_path_factory.mktemp("browser-cache")):
        yield seed_once(stack)


@pytest.fixture(scope="module")
def dashboard(seeded) -> Iterator[str]:
    with serve(create_app(Settings.from_env().replace(dashboard_token=TOKEN))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def test_filter_open_and_rerun_in_the_browser(browser, dashboard, seeded):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    # Home: problems first, the chart, the filters.
    page.goto(dashboard + "/")
    assert page.locator("svg.chart").count() == 1
    assert page.locator("table.versions tbody tr").count() >= 7
    first_status = page.locator("table.versions tbody tr .pill").first.inner_text()
    assert first_status in ("quarantined", "error")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-home.png"), full_page=True)

    # Filter by a reason: the select submits the form on change.
    with page.expect_navigation():
        page.select_option("#filter-reason", "ARTIFACT_MISSING")
    assert "reason=ARTIFACT_MISSING" in page.url
    rows = page.locator("table.versions tbody tr.row")
    assert rows.count() >= 1
    for i in range(rows.count()):
        assert "ARTIFACT_MISSING" in rows.nth(i).locator("td.reasons").inner_text()

    # Open the version whose files are missing (a real validation decides it in a second).
    page.click(f'a.version-link[href$="/versions/{seeded.b}/4"]')
    page.wait_for_url(re.compile(rf"/versions/{re.escape(seeded.b)}/4$"))
    before = int(page.locator("#attempt-count").inner_text())
    assert page.locator(f'details.attempt[data-attempt="{before}"]').count() == 1

    # Without credentials the re-run is refused, and nothing is recorded.
    page.click("#rerun-version")
    status = page.locator(".actions .rerun-status")
    status.filter(has_text="Refused").wait_for()
    assert "CKPT_STAGE_DASHBOARD_TOKEN" in status.inner_text()
    assert int(page.locator("#attempt-count").inner_text()) == before

    # Sign in from the refusal's link: a wrong token first, then the right one.
    status.locator("a", has_text="Sign in").click()
    page.wait_for_url(re.compile(r"/login\?next="))
    page.fill("#token", "not-the-token")
    page.click("#sign-in")
    assert "does not match" in page.locator("#login-error").inner_text()
    page.fill("#token", TOKEN)
    with page.expect_navigation():
        page.click("#sign-in")
    page.wait_for_url(re.compile(rf"/versions/{re.escape(seeded.b)}/4$"))

    # With the session the re-run is accepted; the page reloads once the new attempt is recorded.
    page.click("#rerun-version")
    page.locator(f'details.attempt[data-attempt="{before + 1}"]').wait_for(timeout=90_000)
    assert int(page.locator("#attempt-count").inner_text()) == before + 1
    assert page.locator("#version-status").inner_text() == "quarantined"
    newest = page.locator("details.attempt").first
    assert newest.get_attribute("data-attempt") == str(before + 1)
    assert "ARTIFACT_MISSING" in newest.inner_text()
    page.screenshot(path=str(ARTIFACTS / "dashboard-version.png"), full_page=True)
    assert not errors, errors
    context.close()
