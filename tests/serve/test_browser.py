"""The search page in a real browser: headless Chromium (Debian's `chromium` package) driven by
playwright opens /, types a query, and sees the result images load; and the README picture's
script (docs/serve_screenshot.py, whose page functions these tests use) on the tiny export.

Skipped, with the reason, only where no browser can be had (launch/local.sh installs the
package when it runs as root)."""

import pathlib

import pytest
from helpers import load_script, use_one_device_subprocesses

SCRIPT = load_script(pathlib.Path(__file__).resolve().parents[2], "serve_screenshot", folder="docs")


def _require_browser():
  if SCRIPT.chromium() is None:
    pytest.skip(
      "no Chromium: install the Debian package 'chromium' (apt-get install "
      "chromium; launch/local.sh does it when run as root)"
    )
  pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is missing (requirements.txt)"
  )


@pytest.fixture
def browser_page(tmp_path):
  # Closed after its test: playwright's sync API allows one at a time in a thread, and the
  # script test opens its own.
  _require_browser()
  with SCRIPT.browser_page(str(tmp_path / "chromium-profile")) as page:
    yield page


def test_page_search_shows_loaded_images(server, browser_page, tmp_path):
  page = browser_page
  errors = []
  page.on("pageerror", lambda e: errors.append(str(e)))
  SCRIPT.search(page, server.url, SCRIPT.QUERY, 5)
  assert "40 images indexed" in page.text_content("#index-info")
  sizes = page.eval_on_selector_all(
    "#results img", "els => els.map(i => [i.naturalWidth, i.naturalHeight])"
  )
  assert len(sizes) == 5 and all(w > 0 and h > 0 for w, h in sizes)
  assert page.locator("#results .caption").count() == 5
  assert page.locator("#results .rank").first.text_content() == "#1"
  assert "5 results" in page.text_content("#status")
  assert "q=a+large+blue+square" in page.url  # the search is in the address: shareable
  SCRIPT.screenshot(page, tmp_path / "serve_page.png")
  assert (tmp_path / "serve_page.png").stat().st_size > 0
  # A bad request shows the server's error, naming the field, and keeps the old results.
  page.fill("#k", "0")
  page.press("#query", "Enter")
  page.wait_for_function("document.getElementById('status').classList.contains('error')")
  assert page.text_content("#status").startswith("k: must be in [1, ")
  assert page.locator("#results img").count() == 5
  assert errors == []


def test_screenshot_script_on_the_tiny_export(serve_export, tmp_path, monkeypatch, capsys):
  _require_browser()
  use_one_device_subprocesses(monkeypatch)
  out = tmp_path / "page.png"
  assert SCRIPT.main(["--model", str(serve_export), "--out", str(out), "--k", "5"]) == 0
  assert out.read_bytes().startswith(b"\x89PNG")
  assert "(server exit 0)" in capsys.readouterr().out


def test_the_pictures_query_is_a_test_caption_drawn_by_seed(tiny_workdir):
  from avg_jax.data import dataset

  source = dataset.image_source(str(tiny_workdir), "test", decode_image=False)
  captions = {str(c) for i in range(len(source)) for c in source[i]["captions"]}
  drawn = [SCRIPT.random_test_caption(str(tiny_workdir), seed) for seed in (0, 0, 1, 2, 3)]
  assert drawn[0] == drawn[1] and set(drawn) <= captions
  assert len(set(drawn)) > 1  # seeds draw different captions (10+ test captions)
