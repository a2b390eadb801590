"""Regenerates tests/fixtures/emoji/: a few emoji of the pinned npm packages, trimmed.

    python tests/make_emoji_fixtures.py --download-dir ~/.cache/avg-jax

Reads the unpacked packages that `avg_jax.data.npm_fetch.fetch` leaves in `--download-dir`
(run `avg-jax prepare` with `configs/emoji.py` once, or fetch them by hand) and writes, for
each package, `<name>-<version>/package/` holding only what the emoji source reads for the
chosen emoji (emoji.json, English annotations, their 64 px pictures) and its LICENSE, plus a
`.sha256` marker with the real pin, so that the source treats the folders as fetched. The
emoji are chosen to exercise the caption rules by hand: a hand with its five skin tones (a
split unit of six pictures), three country flags (keyword list "flag" shared), mouse and
mouse face ("mouse" is one's CLDR name and the other's short name), the keycaps "#" and "*"
(names that differ only in a symbol), and a few plain emoji.
"""

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from avg_jax.data import emoji, npm_fetch  # noqa: E402

CHOSEN = (
  "1F44B",
  "1F1EB-1F1F7",
  "1F1E9-1F1EA",
  "1F1EF-1F1F5",
  "1F401",
  "1F42D",
  "0023-FE0F-20E3",
  "002A-FE0F-20E3",
  "1F41D",
  "1F600",
  "2764-FE0F",
  "1F355",
  "1F680",
  "1F333",
  "1F436",
  "1F431",
  "1F34E",
  "2B50",
  "1F308",
  "1F3B8",
)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "emoji")


def _chars(unified: str) -> set[str]:
  c = "".join(chr(int(p, 16)) for p in unified.split("-"))
  return {c, c.replace("\ufe0f", "")}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--download-dir", default="~/.cache/avg-jax")
  args = parser.parse_args()
  roots = npm_fetch.fetch(emoji.PACKAGES, args.download_dir)
  shutil.rmtree(OUT, ignore_errors=True)
  with open(os.path.join(roots["emoji-datasource-google"], "emoji.json"), encoding="utf-8") as f:
    entries = [e for e in json.load(f) if e["unified"] in CHOSEN]
  keys = set()
  for e in entries:
    keys |= _chars(e["unified"])
    for v in (e.get("skin_variations") or {}).values():
      keys |= _chars(v["unified"])
  keys |= {chr(int(t, 16)) for t in ("1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF")}
  for name, (version, sha256) in emoji.PACKAGES.items():
    src, dst = roots[name], os.path.join(OUT, f"{name}-{version}", "package")
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "LICENSE"), dst)
    with open(os.path.join(OUT, f"{name}-{version}", npm_fetch.MARKER), "w") as f:
      f.write(sha256 + "\n")
    if name == "emoji-datasource-google":
      with open(os.path.join(dst, "emoji.json"), "w", encoding="utf-8") as f:
        json.dump(entries, f, ensure_ascii=False, indent=1)
      images = os.path.join(dst, emoji.IMAGE_DIR)
      os.makedirs(images)
      for e in entries:
        for item in [e] + list((e.get("skin_variations") or {}).values()):
          shutil.copy(os.path.join(src, emoji.IMAGE_DIR, item["image"]), images)
      continue
    folder = "annotations" if name == "cldr-annotations-full" else "annotationsDerived"
    with open(os.path.join(src, folder, "en", "annotations.json"), encoding="utf-8") as f:
      content = json.load(f)
    table = content[folder]["annotations"]
    content[folder]["annotations"] = {k: v for k, v in table.items() if k in keys}
    os.makedirs(os.path.join(dst, folder, "en"))
    with open(os.path.join(dst, folder, "en", "annotations.json"), "w", encoding="utf-8") as f:
      json.dump(content, f, ensure_ascii=False, indent=1)
  print(f"wrote {OUT}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
