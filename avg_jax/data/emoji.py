"""The `emoji` dataset: Google's Noto emoji pictures named by Unicode and CLDR, from npm.

Three npm packages, pinned and checked by SHA-256 (`PACKAGES`; fetched by
`avg_jax.data.npm_fetch`):

  emoji-datasource-google 16.0.0    emoji.json (Unicode names, short names, skin-tone
                                    variations) and img/google/64/*.png, 3 786 pictures of
                                    64 x 64 (code MIT; Noto images Apache-2.0)
  cldr-annotations-full 48.2.0      annotations/<lang>/annotations.json: each emoji's CLDR
                                    name ("tts") and keywords ("default") (Unicode-3.0)
  cldr-annotations-derived-full 48.2.0   the same for sequences (skin tones, families, ...)

Captions. Each picture gets one text from each independent source, in this order:

  1. its CLDR name                   "waving hand: light skin tone"
  2. its CLDR keywords, joined       "bye, cya, g2g, greetings, hand, hello, ..., wave, yo"
  3. its Unicode name, lower case    "waving hand sign" (+ ", <tone>" for a skin-tone variant:
                                     the sequence is the base character and a tone modifier)
  4. its short names                 "wave" (underscores as spaces; several joined by ", ";
                                     none for a variation: its base's name it)

**Shared captions.** A text that several pictures carry names none of them alone ("flag" is
the keyword list of all 262 country flags). It stays with the picture whose source for it
ranks first in the order above ("mouse" is the CLDR name of U+1F401 and a short name of
U+1F42D: the CLDR name keeps it); when several pictures tie for that first rank it is
dropped from all of them. Texts are compared after case folding with separators
(spaces, dashes, ,:;.()) ignored, and a source that repeats an earlier text of the same
picture is dropped too. CLDR names are unique, so every picture keeps at least its name.

**Queries and pseudo queries.** The first `data.captions_per_image` texts left are the
picture's captions (an indexed picture's evaluation queries; a training picture's training
captions); the rest are its pseudo queries (`avg_jax.data.pseudo_queries`): under the
transductive protocol they train the generator on the indexed pictures, and since every kept
text names one picture only, no pseudo query can equal an evaluation query
(`check_separation`).

**Split unit.** A base emoji and its skin-tone variations are one unit, assigned to train,
val or test together by a hash of the base code point (`SPLIT_FRACTIONS`). The variations
are one drawing in five colours with the same keywords: split apart, a test picture would
have its twin in training, and retrieval would be measured on memorised twins rather than on
pictures the models never saw. Kept together, the test split holds whole families of tones,
which a query must tell apart by colour.
"""

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Sequence

from avg_jax.data import karpathy
from avg_jax.errors import UserError

# name -> (version, SHA-256 of the tarball `npm pack name@version` writes).
PACKAGES = {
  "emoji-datasource-google": (
    "16.0.0",
    "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438",
  ),
  "cldr-annotations-full": (
    "48.2.0",
    "28576e51225deb51e3ddd734b0f824a0079682cb5d8c27faa9f68149317a14d1",
  ),
  "cldr-annotations-derived-full": (
    "48.2.0",
    "4be946ff5815f806ec78b50363d577a769f2fbfb90c6380a44e161a92436996e",
  ),
}
LICENSES = {
  "emoji-datasource-google": "MIT (emoji.json); the Noto emoji images: Apache-2.0",
  "cldr-annotations-full": "Unicode-3.0",
  "cldr-annotations-derived-full": "Unicode-3.0",
}
IMAGE_DIR = os.path.join("img", "google", "64")
SOURCES = ("cldr_name", "cldr_keywords", "unicode_name", "short_names")
SPLIT_FRACTIONS = (("train", 0.70), ("val", 0.15), ("test", 0.15))
# Changes whenever the captions, pseudo queries or split of a picture change (the prepared
# data's identity).
RULES_VERSION = 1
_SPLIT_SALT = "avg-jax emoji split v1"


@dataclasses.dataclass(frozen=True)
class Picture:
  """One emoji picture and its texts, before the shared-caption rule."""

  image_id: int  # position in emoji.json order (variations after their base)
  unified: str  # code points, e.g. "1F44B-1F3FB"
  group: str  # the base emoji's code points: the split unit
  file_name: str  # "img/google/64/1f44b-1f3fb.png" (relative to the package)
  texts: dict  # source (SOURCES) -> text ("" when the source has none)


def _read_json(path: str, what: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except OSError as e:
    raise UserError(
      f"{path}: cannot read the {what} ({e.strerror or e}); fetch the emoji "
      "packages again (delete the folder)"
    ) from e
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(
      f"{path}: the {what} is not valid JSON ({e}); fetch the emoji packages "
      "again (delete the folder)"
    ) from e


def _annotations(root: str, folder: str, key: str, lang: str) -> dict:
  path = os.path.join(root, folder, lang, "annotations.json")
  content = _read_json(path, f"CLDR {lang} annotations")
  try:
    return content[key]["annotations"]
  except (KeyError, TypeError) as e:
    raise UserError(f"{path}: expected {{{key!r}: {{'annotations': ...}}}}") from e


def _chars(unified: str) -> str:
  return "".join(chr(int(part, 16)) for part in unified.split("-"))


def _lookup(tables: Sequence[dict], unified: str) -> dict | None:
  # CLDR keys emoji without the variation selector U+FE0F that emoji.json's fully qualified
  # code points carry.
  chars = _chars(unified)
  for table in tables:
    for key in (chars, chars.replace("\ufe0f", "")):
      if key in table:
        return table[key]
  return None


def read_pictures(roots: dict[str, str], lang: str = "en") -> list[Picture]:
  """Every picture of `roots["emoji-datasource-google"]` with its texts from the four sources.

  `roots`: package name -> unpacked package folder (the one holding package.json).
  """
  image_root = roots["emoji-datasource-google"]
  emoji = _read_json(os.path.join(image_root, "emoji.json"), "emoji list")
  tables = (
    _annotations(roots["cldr-annotations-full"], "annotations", "annotations", lang),
    _annotations(
      roots["cldr-annotations-derived-full"], "annotationsDerived", "annotationsDerived", lang
    ),
  )
  tones = {
    tone: (_lookup(tables, tone) or {}).get("tts", [""])[0]
    for tone in ("1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF")
  }
  pictures: list[Picture] = []
  for entry in emoji:
    if not isinstance(entry, dict) or "unified" not in entry or "image" not in entry:
      raise UserError(f"{image_root}/emoji.json: an entry without 'unified' / 'image'")
    variations = [(None, entry)] + sorted((entry.get("skin_variations") or {}).items())
    for tone_key, item in variations:
      if not item.get("has_img_google", True):
        continue
      note = _lookup(tables, item["unified"]) or {}
      name = str(entry.get("name") or "").lower()
      if tone_key and name:
        tone_names = [tones.get(t, "") for t in tone_key.split("-")]
        name = ", ".join([name] + [t for t in dict.fromkeys(tone_names) if t])
      texts = {
        "cldr_name": (note.get("tts") or [""])[0],
        "cldr_keywords": ", ".join(note.get("default") or ()),
        "unicode_name": name,
        # A variation's short names are its base's (emoji.json gives it none of its own).
        "short_names": ""
        if tone_key
        else ", ".join(s.replace("_", " ") for s in entry.get("short_names") or ()),
      }
      pictures.append(
        Picture(
          image_id=len(pictures),
          unified=item["unified"],
          group=entry["unified"],
          file_name=os.path.join(IMAGE_DIR, item["image"]),
          texts={k: " ".join(v.split()) for k, v in texts.items()},
        )
      )
  return pictures


def text_key(text: str) -> str:
  """What two texts must share to count as the same caption: case folded, separators
  (spaces, underscores, dashes and ,:;.()) ignored ("Keycap: 1" and "keycap 1" are one;
  "keycap: #" and "keycap: *" are two)."""
  return " ".join(re.sub(r"[\s,:;._()\-\u2013\u2014]+", " ", text.casefold()).split())


def caption_lists(pictures: Sequence[Picture]) -> list[list[str]]:
  """Per picture, its texts in source order less those that name other pictures as well
  (module docstring) and less repeats of its own earlier texts."""
  # key -> (best source rank, pictures that carry the key at that rank)
  owners: dict[str, tuple[int, set]] = {}
  for p in pictures:
    for rank, source in enumerate(SOURCES):
      key = text_key(p.texts[source])
      if not key:
        continue
      best, holders = owners.get(key, (rank, set()))
      if rank < best:
        best, holders = rank, set()
      if rank == best:
        holders.add(p.image_id)
      owners[key] = (best, holders)
  out = []
  for p in pictures:
    kept, seen = [], set()
    for source in SOURCES:
      key = text_key(p.texts[source])
      if key and owners[key][1] == {p.image_id} and key not in seen:
        kept.append(p.texts[source])
        seen.add(key)
    out.append(kept)
  return out


def split_of(group: str) -> str:
  """train / val / test of a split unit, from a hash of its base code points (stable across
  package versions: a new emoji does not move the others)."""
  digest = hashlib.sha256(f"{_SPLIT_SALT}:{group}".encode()).digest()
  u = int.from_bytes(digest[:8], "big") / 2.0**64
  edge = 0.0
  for split, fraction in SPLIT_FRACTIONS:
    edge += fraction
    if u < edge:
      return split
  return SPLIT_FRACTIONS[-1][0]


@dataclasses.dataclass(frozen=True)
class Dataset:
  """The emoji dataset as the Karpathy builder reads it."""

  entries: dict  # split -> [karpathy.Entry] (captions: the first C texts)
  pseudo_queries: list  # [(image id, text)]: every picture's texts after the first C
  too_few: list  # [(path, reason)]: pictures with fewer than C texts


def build(roots: dict[str, str], captions_per_image: int) -> Dataset:
  """Entries per split and pseudo queries (module docstring) from the unpacked packages."""
  pictures = read_pictures(roots)
  captions = caption_lists(pictures)
  entries: dict[str, list[karpathy.Entry]] = {split: [] for split, _ in SPLIT_FRACTIONS}
  pseudo: list[tuple[int, str]] = []
  too_few: list[tuple[str, str]] = []
  image_root = roots["emoji-datasource-google"]
  for p, texts in zip(pictures, captions):
    path = os.path.join(image_root, p.file_name)
    if len(texts) < captions_per_image:
      too_few.append(
        (
          path,
          f"{len(texts)} caption(s) name this picture alone, "
          f"data.captions_per_image is {captions_per_image}",
        )
      )
      continue
    split = split_of(p.group)
    entries[split].append(
      karpathy.Entry(
        image_id=p.image_id,
        split=split,
        file_name=p.file_name,
        path=path,
        captions=tuple(texts[:captions_per_image]),
      )
    )
    pseudo.extend((p.image_id, t) for t in texts[captions_per_image:])
  return Dataset(entries=entries, pseudo_queries=pseudo, too_few=too_few)


def check_separation(dataset: Dataset) -> None:
  """Raises if a pseudo query equals (by `text_key`) a caption of a val / test picture: the
  transductive protocol must never train on an evaluation query."""
  queries = {
    text_key(c) for split in ("val", "test") for e in dataset.entries[split] for c in e.captions
  }
  leaked = [q for _, q in dataset.pseudo_queries if text_key(q) in queries]
  if leaked:
    raise AssertionError(
      f"{len(leaked)} pseudo queries equal evaluation captions, e.g. {leaked[0]!r}"
    )
