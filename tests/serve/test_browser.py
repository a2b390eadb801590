"""The search page in a real browser: headless Chromium (Debian's `chromium` package) driven by
playwright opens /, types a query, and sees the result images load.

Skipped, with the reason, only where no browser can be had (launch/local.sh installs the
package when it runs as root). AVG_JAX_SCREENSHOT=path also saves the screenshot there, of the
tiny test export, or of AVG_JAX_SCREENSHOT_MODEL=EXPORT when given (the README's picture:
`AVG_JAX_SCREENSHOT=docs/serve_page.png AVG_JAX_SCREENSHOT_MODEL=runs/smoke/export
launch/local.sh test tests/serve/test_browser.py`)."""

import os
import pathlib
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# No network, no background services, a fresh profile: nothing but the page under test.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
  if CHROMIUM is None:
    pytest.skip("no Chromium: install the Debian package 'chromium' (apt-get install "
                "chromium; launch/local.sh does it when run as root)")
  sync_api = pytest.importorskip("playwright.sync_api",
                                 reason="the playwright package is missing (requirements.txt)")
  profile = tmp_path_factory.mktemp("chromium-profile")
  with sync_api.sync_playwright() as p:
    # A persistent context is how playwright takes an explicit, fresh --user-data-dir.
    context = p.chromium.launch_persistent_context(
        str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
        viewport={"width": 1100, "height": 760})
    try:
      yield context.new_page()
    finally:
      context.close()


def _search(page, url: str, query: str, k: int) -> None:
  """Types `query` into the page at `url` and waits until all k result images have loaded."""
  page.goto(url + "/", wait_until="load")
  page.wait_for_function("document.getElementById('index-info').textContent.includes('images')")
  page.fill("#query", query)
  page.fill("#k", str(k))
  page.press("#query", "Enter")
  page.wait_for_selector("#results li.card img")
  # Every result image has loaded: naturalWidth is 0 until the bytes decode.
  page.wait_for_function(
      f"[...document.querySelectorAll('#results img')].length === {k} && "
      "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")


def _screenshot(page, path) -> None:
  page.screenshot(path=str(path), full_page=True)
  assert path.stat().st_size > 0


def test_page_search_shows_loaded_images(server, browser_page, tmp_path):
  page = browser_page
  errors = []
  page.on("pageerror", lambda e: errors.append(str(e)))
  _search(page, server.url, "a large blue square near the bottom", 5)
  assert "40 images indexed" in page.text_content("#index-info")
  sizes = page.eval_on_selector_all("#results img", "els => els.map(i => [i.naturalWidth, "
                                    "i.naturalHeight])")
  assert len(sizes) == 5 and all(w > 0 and h > 0 for w, h in sizes)
  assert page.locator("#results .caption").count() == 5
  assert page.locator("#results .rank").first.text_content() == "#1"
  assert "5 results" in page.text_content("#status")
  assert "q=a+large+blue+square" in page.url  # the search is in the address: shareable
  _screenshot(page, tmp_path / "serve_page.png")
  if os.environ.get("AVG_JAX_SCREENSHOT") and not os.environ.get("AVG_JAX_SCREENSHOT_MODEL"):
    shutil.copyfile(tmp_path / "serve_page.png", os.environ["AVG_JAX_SCREENSHOT"])
  # A bad request shows the server's error, naming the field, and keeps the old results.
  page.fill("#k", "0")
  page.press("#query", "Enter")
  page.wait_for_function("document.getElementById('status').classList.contains('error')")
  assert page.text_content("#status").startswith("k: must be in [1, ")
  assert page.locator("#results img").count() == 5
  assert errors == []


@pytest.mark.skipif(not os.environ.get("AVG_JAX_SCREENSHOT_MODEL"),
                    reason="AVG_JAX_SCREENSHOT_MODEL not set (only for the README's picture)")
def test_screenshot_of_another_export(start_server, browser_page):
  server = start_server(os.environ["AVG_JAX_SCREENSHOT_MODEL"])
  _search(browser_page, server.url, "a large blue square near the bottom", 10)
  path = pathlib.Path(os.environ.get("AVG_JAX_SCREENSHOT", "serve_page.png"))
  _screenshot(browser_page, path)
  assert server.stop() == 0
