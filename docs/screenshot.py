"""Regenerates docs/console.png, the README's picture of the console's comparison page:

    .venv/bin/python docs/screenshot.py

The store and the browser are the browser tests' (tests/test_console_browser.py): real policies
evaluated on the held-out packs, photographed in the system Chromium.
"""

import io
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_console import seed_store  # noqa: E402
from tests.test_console_browser import CHROMIUM, QUIET, live_console, log_in, sync_api  # noqa: E402

with tempfile.TemporaryDirectory() as tmp, sync_api.sync_playwright() as p:
    db = Path(tmp) / "apprentice.db"
    seed_store(db, Path(tmp) / "adapters")
    with live_console(db) as url:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=QUIET)
        page = browser.new_page(viewport={"width": 1200, "height": 1040})
        log_in(page, url, "ana", start="/compare")
        png = page.screenshot()
        browser.close()
# 64 colours keep the text sharp and the file small.
Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=64).save(ROOT / "docs" / "console.png", optimize=True)
print(f"wrote docs/console.png ({(ROOT / 'docs' / 'console.png').stat().st_size // 1024} KB)")
