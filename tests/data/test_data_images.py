"""Reading untrusted images: only the formats avg-jax means to read (never PIL's EPS plugin,
which runs Ghostscript), SVGs drawn by resvg with no outside references, pixel budgets checked
on the header, and worker processes that are killed past their time budget."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from avg_jax.data import image_worker, images, svg

# An EPS whose PostScript loops for ever: Ghostscript never returns on it.
EPS_LOOP = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n{} loop\n"
SVG_NS = 'xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink"'
FORMATS_TEXT = "not an image in a format avg-jax reads (PNG, JPEG, WebP, GIF, BMP or SVG)"


def _png(image: Image.Image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


def test_eps_and_other_pil_plugins_are_never_opened(tmp_path, monkeypatch):
  import subprocess

  called = []
  monkeypatch.setattr(subprocess, "check_call", lambda *a, **k: called.append(a))
  monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: called.append(a))
  (tmp_path / "loop.eps").write_bytes(EPS_LOOP)
  (tmp_path / "loop.png").write_bytes(EPS_LOOP)  # the name does not matter
  Image.new("RGB", (8, 8)).save(tmp_path / "a.tiff")
  for name in ("loop.eps", "loop.png", "a.tiff"):
    assert images.check_file(str(tmp_path / name)) == FORMATS_TEXT, name
  assert images.check_bytes(EPS_LOOP, images.UPLOAD_FORMATS) == (
    "not an image in a format avg-jax reads (PNG, JPEG, WebP or SVG)"
  )
  with pytest.raises(Image.UnidentifiedImageError):
    images.load_resized(str(tmp_path / "loop.eps"), 8)
  assert not called  # no Ghostscript


def test_svg_is_drawn_with_transparent_pixels_white(tmp_path):
  # A red left half, a transparent right half; 10 x 20 declared, drawn at the crop size.
  (tmp_path / "half.svg").write_text(
    f'<svg {SVG_NS} width="10" height="20"><rect width="5" height="20" fill="#ff0000"/></svg>'
  )
  assert images.check_file(str(tmp_path / "half.svg")) == ""
  pixels = images.load_resized(str(tmp_path / "half.svg"), 16)
  assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
  np.testing.assert_array_equal(pixels[:, :7], np.tile([255, 0, 0], (16, 7, 1)))
  np.testing.assert_array_equal(pixels[:, 9:], np.full((16, 7, 3), 255))
  # The same drawing as bytes (Retriever.add, the service's workers) gives the same pixels.
  data = (tmp_path / "half.svg").read_bytes()
  np.testing.assert_array_equal(
    images.worker_job({"formats": list(images.UPLOAD_FORMATS), "size": 16}, data), pixels
  )


def test_svg_size_is_bounded_whatever_it_declares():
  huge = f'<svg {SVG_NS} width="100000" height="100000"/>'.encode()
  pil = svg.rasterise(huge, max_pixels=10_000, min_side=64)
  assert pil.size == (64, 64)
  pil = svg.rasterise(huge, max_pixels=100, min_side=64)
  assert pil.size[0] * pil.size[1] <= 100
  tall = f'<svg {SVG_NS} width="1" height="100000"/>'.encode()  # aspect 1 : 100 000
  assert svg.rasterise(tall, max_pixels=10**8, min_side=8).size == (1, 64)
  assert svg.render_box(200, 100, 10**8, 256) == (512, 256)


@pytest.mark.parametrize(
  "body, reason",
  [
    ('<image href="{probe}" width="4" height="4"/>', "unsupported SVG: refers to"),
    ('<image xlink:href="file://{probe}" width="4" height="4"/>', "unsupported SVG: refers to"),
    ("<style>@import url(x.css);</style>", "unsupported SVG: imports a style sheet"),
    ('<rect style="fill: url(/etc/x)"/>', "unsupported SVG: refers to '/etc/x'"),
  ],
)
def test_svg_references_outside_the_document_are_refused(tmp_path, body, reason):
  probe = tmp_path / "probe.png"
  Image.new("RGB", (4, 4), (0, 255, 0)).save(probe)
  data = f'<svg {SVG_NS} width="4" height="4">{body.format(probe=probe)}</svg>'.encode()
  assert images.check_bytes(data).startswith(reason), images.check_bytes(data)


def test_svg_entity_that_hides_a_file_reference_is_refused(tmp_path):
  data = (
    f'<!DOCTYPE svg [<!ENTITY p "{tmp_path}/probe.png">]><svg {SVG_NS}>'
    f'<image xlink:href="&p;"/></svg>'
  ).encode()
  assert images.check_bytes(data).startswith("unsupported SVG: refers to ")


def test_svg_that_cannot_be_read_gets_a_reason(tmp_path):
  assert images.check_bytes(b"<svg hello").startswith("cannot decode (SVG: ")
  assert images.check_bytes(f"<svg {SVG_NS}><rect></svg>".encode()).startswith(
    "cannot decode (SVG: mismatched tag"
  )
  assert images.check_bytes(b"<?xml version='1.0'?><html><svg/></html>") == (
    "unsupported SVG: the root element is <html>, not <svg>"
  )
  assert images.check_bytes(b"<svg>\xff</svg>").startswith("cannot decode (SVG: byte 5 ")
  assert images.check_bytes(b"<svg>x</svg>", ("PNG",)) == "unsupported format (SVG)"


def test_pixel_budget_is_checked_before_decoding():
  bomb = _png(Image.new("L", (20_000, 20_000)))  # 400 M pixels in ~390 KB
  assert len(bomb) < 1 << 20
  with pytest.raises(
    images.ImageProblem,
    match=r"^too large \(400000000 pixels; the limit "
    r"is 40000000\)$",
  ):
    images.worker_job({"formats": ["PNG"], "max_pixels": 40_000_000, "size": 8}, bomb)
  small = _png(Image.new("L", (300, 200)))
  with pytest.raises(
    images.ImageProblem,
    match=r"too large \(60000 pixels; the limit is "
    r"50000\)",
  ):
    images.worker_job({"formats": ["PNG"], "max_pixels": 50_000, "size": 8}, small)


def test_worker_past_its_time_budget_is_killed_and_replaced(monkeypatch):
  pool = image_worker.WorkerPool(1, env={image_worker.HANG_ENV: "HANG"})
  params = {"formats": list(images.UPLOAD_FORMATS), "max_pixels": 10**6, "size": 8}
  png = _png(Image.new("RGBA", (12, 10), (0, 0, 0, 0)))
  try:
    # Generous budgets for real work (a busy machine), a small one for the hung decoder.
    np.testing.assert_array_equal(pool.run(params, png, timeout=120), np.full((8, 8, 3), 255))
    first = pool.workers[0].pid
    with pytest.raises(
      images.ImageProblem, match=r"^took longer than 0\.5 s to decode \(stopped\)$"
    ):
      pool.run(params, b"HANG and never answer", timeout=0.5)
    assert pool.workers[0].pid is None  # killed
    with pytest.raises(OSError):
      os.kill(first, 0)
    np.testing.assert_array_equal(pool.run(params, png, timeout=120), np.full((8, 8, 3), 255))
    with pytest.raises(images.ImageProblem, match="not an image in a format avg-jax reads"):
      pool.run(params, EPS_LOOP, timeout=120)
  finally:
    pool.close()


def test_worker_memory_cap_turns_a_huge_allocation_into_a_reason():
  # 16 000 x 16 000 grey is 256 MB decoded, 768 MB as RGB: past a 768 MB address space.
  pool = image_worker.WorkerPool(1, memory_bytes=768 << 20)
  data = _png(Image.new("L", (16_000, 16_000)))
  try:
    with pytest.raises(images.ImageProblem, match=r"too large|the decoder failed"):
      pool.run({"formats": ["PNG"], "max_pixels": 10**9, "size": 8}, data, timeout=300)
  finally:
    pool.close()


def test_a_worker_outlives_the_thread_that_first_used_it():
  # prepare checks images in a thread pool that ends before the shards are written; a worker
  # started from one of its threads must still answer afterwards.
  import threading

  pool = image_worker.WorkerPool(1)
  params = {"formats": ["PNG"], "size": 4}
  png = _png(Image.new("RGB", (6, 6), (9, 9, 9)))
  try:
    thread = threading.Thread(target=lambda: pool.run(params, png, timeout=120))
    thread.start()
    thread.join()
    pid = pool.workers[0].pid
    threading.Event().wait(0.5)  # time for a death signal to arrive, were one sent
    np.testing.assert_array_equal(pool.run(params, png, timeout=120), np.full((4, 4, 3), 9))
    assert pool.workers[0].pid == pid
  finally:
    pool.close()
