"""SVG pictures as images: checked, then rasterised by resvg (the `resvg-py` wheel: Rust, no
system library) into an RGBA PIL image.

    image = svg.rasterise(data, max_pixels=16_000_000, min_side=64)   # PIL "RGBA"

Checks before resvg sees the text (each failure is an `SvgProblem` whose text is the reason a
user sees):
- well-formed XML whose root element is `svg` (read with expat, which caps entity expansion);
- no reference outside the document: every `href` is `#fragment` or a `data:` raster image,
  and no CSS `url(...)` but `url(#...)` nor `@import`. resvg reads an `<image href="/path">`
  from the disk of the process that renders it: a client's SVG must never show the server's
  files.

Size: a vector drawing has no native resolution, so it is drawn straight at the size it is
needed at: its declared shape (`width`/`height`, else the `viewBox`, else 100 x 100, as resvg
does) scaled so that its shorter side is `min_side` (the crop `prepare` stores; a PNG would
be decoded whole and then shrunk to it), then down to at most `max_pixels` pixels. resvg fits
the drawing into that box, so the pixel budget holds whatever the declared size says.
Transparent pixels stay transparent here; `images.to_rgb` composites them onto white, as for
a PNG.
"""

import gzip
import io
import math
import re
from xml.parsers import expat

from PIL import Image

# Text of an SVG file or upload is at most this (after gunzip for .svgz): a bound on what
# expat and resvg parse, far above clip art (Tux Paint's largest stamp is ~2 MB).
MAX_SVG_BYTES = 32 << 20
_SVG_SUFFIXES = (".svg", ".svgz")
MAX_ASPECT = 8
_RASTER_DATA = (
  "data:image/png",
  "data:image/jpeg",
  "data:image/jpg",
  "data:image/webp",
  "data:image/gif",
)
# CSS lengths in px (CSS 96 dpi); "%" and unknown units fall back to the viewBox.
_UNITS = {
  "": 1.0,
  "px": 1.0,
  "pt": 96 / 72,
  "pc": 16.0,
  "mm": 96 / 25.4,
  "cm": 96 / 2.54,
  "in": 96.0,
  "em": 16.0,
  "ex": 8.0,
}
_LENGTH = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-z]*)\s*$")
_CSS_URL = re.compile(r"url\(\s*['\"]?\s*([^'\")\s]*)", re.IGNORECASE)


class SvgProblem(Exception):
  """Why an SVG cannot be used (the message is the reason shown to the user)."""


def is_svg(name: str, head: bytes) -> bool:
  """Whether a file named `name` starting with `head` (its first KiB) is an SVG."""
  if name.lower().endswith(_SVG_SUFFIXES):
    return True
  if head.startswith(b"\x1f\x8b") and name.lower().endswith(".svgz"):
    return True
  text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
  return text.startswith(b"<svg") or (
    text.startswith((b"<?xml", b"<!doctype", b"<!--")) and b"<svg" in text
  )


def _text(data: bytes) -> str:
  """The SVG's text (gunzipped when .svgz), bounded by MAX_SVG_BYTES."""
  if data.startswith(b"\x1f\x8b"):
    try:
      with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
        data = f.read(MAX_SVG_BYTES + 1)
    except (OSError, EOFError) as e:
      raise SvgProblem(f"cannot decode (SVG: not valid gzip: {e})") from e
  if len(data) > MAX_SVG_BYTES:
    raise SvgProblem(f"too large (SVG text over {MAX_SVG_BYTES} bytes)")
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise SvgProblem(f"cannot decode (SVG: byte {e.start} is not valid UTF-8)") from e


def _outside_reference(value: str) -> bool:
  value = value.strip()
  return bool(value) and not value.startswith("#") and not value.lower().startswith(_RASTER_DATA)


def _css_problem(css: str) -> str:
  if "@import" in css.lower():
    return "imports a style sheet (@import)"
  for target in _CSS_URL.findall(css):
    if not target.startswith("#"):
      return f"refers to {target[:80]!r} outside the document (url())"
  return ""


def check(data: bytes) -> tuple[str, dict]:
  """`(text, the root element's attributes)` of an SVG that may be rasterised; `SvgProblem`
  otherwise (module doc)."""
  text = _text(data)
  roots: list[dict] = []  # the root element's attributes, once seen
  problems: list[str] = []
  in_style = [0]

  def start(name, attrs):
    local = name.rsplit(":", 1)[-1]
    if not roots:
      if local != "svg":
        problems.append(f"the root element is <{name[:40]}>, not <svg>")
      roots.append(dict(attrs))
    for key, value in attrs.items():
      key_local = key.rsplit(":", 1)[-1]
      if key_local == "href" and _outside_reference(value):
        problems.append(f"refers to {value.strip()[:80]!r} outside the document (href)")
      elif key_local == "style" and _css_problem(value):
        problems.append(_css_problem(value))
    if local == "style":
      in_style[0] += 1

  def end(name):
    if name.rsplit(":", 1)[-1] == "style":
      in_style[0] -= 1

  def chars(data):
    if in_style[0] and _css_problem(data):
      problems.append(_css_problem(data))

  def external_entity(context, base, system_id, public_id):
    problems.append("declares an external entity")
    return 1

  parser = expat.ParserCreate()
  parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
  parser.StartElementHandler, parser.EndElementHandler = start, end
  parser.CharacterDataHandler = chars
  parser.ExternalEntityRefHandler = external_entity
  try:
    parser.Parse(text, True)
  except expat.ExpatError as e:
    raise SvgProblem(f"cannot decode (SVG: {expat.ErrorString(e.code)} at line {e.lineno})") from e
  if not roots:
    raise SvgProblem("cannot decode (SVG: no root element)")
  if problems:
    raise SvgProblem(f"unsupported SVG: {problems[0]}")
  return text, roots[0]


def _length(value: str | None) -> float | None:
  match = _LENGTH.match(value or "")
  if not match or match.group(2) not in _UNITS:
    return None
  return float(match.group(1)) * _UNITS[match.group(2)]


def declared_size(root: dict) -> tuple[float, float]:
  """`(width, height)` in px the SVG asks for (module doc), each > 0."""
  width, height = _length(root.get("width")), _length(root.get("height"))
  box = [
    float(v)
    for v in re.findall(r"[-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?", root.get("viewBox", ""))
  ]
  box_w, box_h = (box[2], box[3]) if len(box) == 4 and box[2] > 0 and box[3] > 0 else (None, None)
  if width is None or width <= 0:
    width = box_w if box_w else 100.0
  if height is None or height <= 0:
    height = box_h if box_h else 100.0
  return width, height


def render_box(width: float, height: float, max_pixels: int, min_side: int) -> tuple[int, int]:
  """The `(width, height)` box resvg draws into: the declared shape with `min_side` on its
  shorter side, its longer side at most `MAX_ASPECT` times that (a centre crop keeps no more
  of an elongated drawing), then down to at most `max_pixels` pixels."""
  scale = min_side / min(width, height)
  cap = MAX_ASPECT * min_side
  box_w, box_h = min(width * scale, cap), min(height * scale, cap)
  if box_w * box_h > max_pixels:
    shrink = math.sqrt(max_pixels / (box_w * box_h))
    box_w, box_h = box_w * shrink, box_h * shrink
  return max(1, int(box_w)), max(1, int(box_h))


# The shorter side of a drawing that is only checked (`prepare`'s check of every file).
CHECK_SIDE = 256


def rasterise(data: bytes, *, max_pixels: int, min_side: int = CHECK_SIDE) -> Image.Image:
  """The SVG in `data` as an RGBA image of at most `max_pixels` pixels (module doc);
  `SvgProblem` with the reason when it cannot be used."""
  import resvg_py  # only where SVGs are drawn: the data pipeline's workers never need it

  text, root = check(data)
  box = render_box(*declared_size(root), max_pixels=max_pixels, min_side=min_side)
  try:
    png = resvg_py.svg_to_bytes(svg_string=text, width=box[0], height=box[1])
  except (KeyboardInterrupt, SystemExit):
    raise
  except BaseException as e:  # noqa: BLE001 - resvg's errors include pyo3's PanicException
    raise SvgProblem(f"cannot decode (SVG: {str(e)[:200] or type(e).__name__})") from e
  with Image.open(io.BytesIO(bytes(png)), formats=["PNG"]) as pil:
    pil.load()
    return pil.convert("RGBA")
