"""The README's picture of the search page: serves an export, searches it in headless Chromium
and saves a full-page screenshot.

    python docs/serve_screenshot.py --model runs/smoke/export --out docs/serve_page.png
    python docs/serve_screenshot.py --model runs/emoji/export --query-from runs/emoji --seed 0

`--query-from WORKDIR` searches for a caption drawn at random (`--seed`) from that workdir's
test split instead of `--query`.

Needs Debian's `chromium` (`launch/local.sh test` installs it when run as root) and playwright
(requirements.txt); no browser is downloaded. tests/serve/test_browser.py drives the page with
the same functions and runs this script on the tiny test export.
"""

import argparse
import contextlib
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence

# No network, no background services, a fresh profile: nothing but the page itself.
CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
]
QUERY = "a large blue square near the bottom"


def chromium() -> str | None:
  """The path of Debian's chromium, or None."""
  return shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def browser_page(profile: str) -> Iterator:
  """A playwright page in headless Chromium with the fresh profile folder `profile`."""
  from playwright import sync_api

  with sync_api.sync_playwright() as p:
    # A persistent context is how playwright takes an explicit, fresh --user-data-dir.
    context = p.chromium.launch_persistent_context(
      profile,
      executable_path=chromium(),
      headless=True,
      args=CHROMIUM_ARGS,
      viewport={"width": 1100, "height": 760},
    )
    try:
      yield context.new_page()
    finally:
      context.close()


def search(page, url: str, query: str, k: int) -> None:
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
    "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
  )


def random_test_caption(workdir: str, seed: int) -> str:
  """One caption of the workdir's prepared test split, drawn with `seed` (uniform over the
  split's captions)."""
  import numpy as np

  from avg_jax.data import dataset

  source = dataset.image_source(workdir, "test", decode_image=False)
  captions = [str(c) for i in range(len(source)) for c in source[i]["captions"]]
  if not captions:
    raise ValueError(f"{workdir}: the test split has no caption")
  return captions[int(np.random.default_rng(seed).integers(len(captions)))]


def screenshot(page, path: pathlib.Path) -> None:
  page.screenshot(path=str(path), full_page=True)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True, help="an export folder")
  parser.add_argument("--out", default="docs/serve_page.png")
  parser.add_argument("--query", default=QUERY)
  parser.add_argument(
    "--query-from",
    default="",
    metavar="WORKDIR",
    help="search a random test caption of this workdir instead",
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--k", type=int, default=10)
  args = parser.parse_args(argv)
  query = random_test_caption(args.query_from, args.seed) if args.query_from else args.query
  if chromium() is None:
    print("serve_screenshot: error: no chromium (the Debian package 'chromium')", file=sys.stderr)
    return 2
  from avg_jax.bench.serve import ServerProcess

  server = ServerProcess(args.model)
  try:
    with tempfile.TemporaryDirectory() as profile, browser_page(profile) as page:
      search(page, server.url, query, args.k)
      screenshot(page, pathlib.Path(args.out))
  finally:
    code = server.stop()
  print(f"serve_screenshot: wrote {args.out} for {query!r} (server exit {code})")
  return 0 if code == 0 else 1


if __name__ == "__main__":
  sys.exit(main())
