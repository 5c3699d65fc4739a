"""The console in a real headless Chromium (Playwright driving the system's browser; Playwright's
own browser download is never used): log in, see the overview, open a comparison, approve with a
note, get refused, be read-only, and a comparison page that renders to pixels."""

import io
import os
import shutil
import threading
import time
from contextlib import contextmanager

import pytest
import uvicorn

from ops.console import Console, create_app
from store import Store
from tests.test_console import HELDOUT, OPERATORS, TOKENS, seed_store

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("APPRENTICE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    # CI installs Chromium (ops/install.sh), so there a missing browser is a failure, not a skip.
    if os.environ.get("CI"):
        pytest.fail("no Chromium found: ops/install.sh installs Debian's chromium; or set APPRENTICE_CHROMIUM", pytrace=False)
    pytest.skip("no Chromium found (set APPRENTICE_CHROMIUM to its path)", allow_module_level=True)
# A closed network: Chromium must not try to phone home at start.
QUIET = ["--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=QUIET)
        yield browser
        browser.close()


@contextmanager
def live_console(db):
    """The console under a real uvicorn on a free loopback port; yields its URL."""
    server = uvicorn.Server(uvicorn.Config(create_app(Console(db, OPERATORS, HELDOUT)), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def console(tmp_path):
    db = tmp_path / "apprentice.db"
    seed_store(db, tmp_path / "adapters")
    with live_console(db) as url:
        yield db, url


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


def log_in(page, url, name, start="/"):
    page.goto(url + start)
    assert page.url.startswith(f"{url}/login")  # no session yet: the login page
    page.fill("#token", TOKENS[name])
    page.get_by_role("button", name="Log in").click()
    page.wait_for_selector(f".who >> text={name}")


def test_operator_compares_and_approves_a_candidate(console, page):
    db, url = console
    log_in(page, url, "ana")
    assert page.inner_text("h1") == "Overview"
    assert "v0001" in page.inner_text(".cards")  # awaiting approval
    page.get_by_role("link", name="Compare", exact=True).click()
    assert page.inner_text("h2.pair").split()[:3] == ["v0001", "awaiting", "approval"]
    assert page.locator("table.metrics caption").count() == 4  # overall, both held-out companies, recall by reason
    ticket = page.locator("details.ticket").first
    ticket.locator("summary").click()
    assert ticket.locator("ol.steps li").first.is_visible() and "checker:" in ticket.inner_text()

    page.fill("#approve textarea[name=note]", "recall up, over-escalation down, paired")
    page.get_by_role("button", name="Approve v0001").click()
    assert page.inner_text(".flash") == "v0001 promoted by ana"
    store = Store.open(db)
    last = store.decisions()[-1]
    assert (last.adapter_version, last.action, last.by, last.note) == ("v0001", "approve", "ana", "recall up, over-escalation down, paired")
    assert store.promoted_version() == "v0001" and store.adapter("v0001").status == "promoted"
    page.get_by_role("link", name="Decisions", exact=True).click()
    assert "recall up, over-escalation down, paired" in page.inner_text("table.decisions tbody tr >> nth=0")


def test_approving_a_version_the_gate_refused_needs_force(console, page):
    db, url = console
    log_in(page, url, "ana", start="/compare?candidate=v0002")
    page.fill("#approve textarea[name=note]", "looks fine to me")
    page.get_by_role("button", name="Approve v0002").click()
    flash = page.inner_text(".flash.refused")
    assert flash.startswith("refused: v0002 is rejected_by_gate (") and "approve it anyway with --force and a --note saying why" in flash
    assert Store.open(db).promoted_version() is None
    page.fill("#approve textarea[name=note]", "the gate's set is small; watching the swap")
    page.check("#approve input[name=force]")
    page.get_by_role("button", name="Approve v0002").click()
    assert page.inner_text(".flash.ok") == "v0002 promoted by ana"
    assert Store.open(db).decisions()[-1].action == "approve_forced"


def test_read_only_operator_is_refused(console, page):
    db, url = console
    log_in(page, url, "lee", start="/compare?candidate=v0001")
    assert page.locator("#approve").count() == 0 and "Read-only" in page.inner_text("section.decision")
    # The same POST the approve form would send, from inside the logged-in browser session.
    csrf = page.get_attribute(".who input[name=csrf]", "value")
    response = page.request.post(f"{url}/adapters/v0001/approve", form={"csrf": csrf, "note": "mine now"}, max_redirects=0)
    assert response.status == 403 and "lee is a read-only operator" in response.text()
    assert Store.open(db).promoted_version() is None


def test_comparison_page_renders_to_a_real_screenshot(console, page):
    from PIL import Image, ImageStat

    _, url = console
    log_in(page, url, "ana", start="/compare")
    png = page.screenshot(full_page=True)
    image = Image.open(io.BytesIO(png)).convert("L")
    assert image.width == 1280 and image.height > 900  # the full comparison, longer than one screen
    assert ImageStat.Stat(image).stddev[0] > 20  # text, tables and colour, not a blank page
    assert len(image.getcolors(maxcolors=1 << 16)) > 50  # anti-aliased text has many grey levels
