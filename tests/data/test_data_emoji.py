"""The emoji source (avg_jax/data/emoji.py) and pinned npm packages (avg_jax/data/npm_fetch.py)
on the trimmed packages in tests/fixtures/emoji (tests/make_emoji_fixtures.py); no network."""

import json
import os
import shutil
import stat
import sys
import tarfile

import pytest

from avg_jax import config as config_lib
from avg_jax.data import dataset, emoji, npm_fetch
from avg_jax.errors import UserError
from avg_jax.stages import prepare

FIXTURES = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "emoji"
)


def fixture_roots() -> dict[str, str]:
  return {
    name: os.path.join(FIXTURES, f"{name}-{version}", "package")
    for name, (version, _) in emoji.PACKAGES.items()
  }


def captions_by_code() -> dict[str, list[str]]:
  pictures = emoji.read_pictures(fixture_roots())
  return {p.unified: texts for p, texts in zip(pictures, emoji.caption_lists(pictures))}


def test_caption_rules_hand_checked():
  captions = captions_by_code()
  # Sources in order: CLDR name, keywords, Unicode name, short names; repeats dropped.
  assert captions["1F41D"] == [
    "honeybee",
    "animal, bee, bumblebee, honey, honeybee, insect, nature, spring",
    "bee, honeybee",
  ]
  # The flags' only keyword list is "flag", shared by all three: dropped from each.
  for code, country in (
    ("1F1EB-1F1F7", "France"),
    ("1F1E9-1F1EA", "Germany"),
    ("1F1EF-1F1F5", "Japan"),
  ):
    assert captions[code][0] == f"flag: {country}"
    assert "flag" not in captions[code]
  # "mouse" is U+1F401's CLDR name and U+1F42D's short name: the first-ranked source keeps it.
  assert captions["1F401"][0] == "mouse"
  assert captions["1F42D"] == ["mouse face", "animal, face, mouse"]
  # Keycaps: names that differ only in a symbol stay two captions; the shared keyword goes.
  assert captions["0023-FE0F-20E3"] == ["keycap: #", "hash key", "hash"]
  assert captions["002A-FE0F-20E3"] == ["keycap: *", "keycap star"]
  # A skin tone: its own CLDR name and keywords, the base's Unicode name with the tone, and
  # no short name (the base's would name all six pictures).
  assert captions["1F44B-1F3FD"] == [
    "waving hand: medium skin tone",
    "bye, cya, g2g, greetings, gtg, hand, hello, hey, hi, later, medium skin tone, outtie, "
    "ttfn, ttyl, wave, yo, you",
    "waving hand sign, medium skin tone",
  ]
  assert captions["1F44B"][-1] == "wave"


def test_every_kept_text_names_one_picture():
  keys = [emoji.text_key(t) for texts in captions_by_code().values() for t in texts]
  assert len(keys) == len(set(keys))


def test_text_key_ignores_separators_not_symbols():
  assert emoji.text_key("Keycap: 1") == emoji.text_key("keycap 1")
  assert emoji.text_key("flag-de") == emoji.text_key("flag de")
  assert emoji.text_key("keycap: #") != emoji.text_key("keycap: *")


def test_skin_tones_share_their_base_split():
  pictures = emoji.read_pictures(fixture_roots())
  hands = [p for p in pictures if p.group == "1F44B"]
  assert len(hands) == 6
  assert len({emoji.split_of(p.group) for p in hands}) == 1


def test_split_fractions():
  counts = {"train": 0, "val": 0, "test": 0}
  for i in range(6000):
    counts[emoji.split_of(f"{i:X}")] += 1
  assert abs(counts["train"] / 6000 - 0.70) < 0.03
  assert abs(counts["val"] / 6000 - 0.15) < 0.03
  assert abs(counts["test"] / 6000 - 0.15) < 0.03


@pytest.mark.parametrize("captions_per_image", [1, 2])
def test_no_evaluation_query_is_a_training_text(captions_per_image):
  """What the generator trains on (training captions, every picture's pseudo queries) never
  holds a val / test caption, the queries it is evaluated on."""
  data = emoji.build(fixture_roots(), captions_per_image)
  emoji.check_separation(data)
  queries = {
    emoji.text_key(c) for s in ("val", "test") for e in data.entries[s] for c in e.captions
  }
  assert queries
  trained = [c for e in data.entries["train"] for c in e.captions]
  trained += [q for _, q in data.pseudo_queries]
  assert not queries & {emoji.text_key(t) for t in trained}
  # Every picture's texts after its first C are its pseudo queries; none has fewer than C.
  assert all(len(e.captions) == captions_per_image for v in data.entries.values() for e in v)


def test_pictures_with_too_few_texts_are_listed():
  data = emoji.build(fixture_roots(), 3)
  reasons = dict(data.too_few)
  rocket = os.path.join(fixture_roots()["emoji-datasource-google"], emoji.IMAGE_DIR, "1f680.png")
  assert reasons[rocket] == ("2 caption(s) name this picture alone, data.captions_per_image is 3")
  assert all(len(e.captions) == 3 for v in data.entries.values() for e in v)


def test_check_separation_catches_a_leak():
  data = emoji.build(fixture_roots(), 1)
  test_entry = (data.entries["test"] or data.entries["val"])[0]
  leaked = emoji.Dataset(
    entries=data.entries,
    pseudo_queries=data.pseudo_queries + [(0, test_entry.captions[0])],
    too_few=[],
  )
  with pytest.raises(AssertionError, match="equal evaluation captions"):
    emoji.check_separation(leaked)


# --- npm_fetch -----------------------------------------------------------------------------


def _tarball(tmp_path, name: str, extra: tarfile.TarInfo | None = None) -> str:
  """A tarball of the fixture package `name` as npm packs it (a top-level package/)."""
  version = emoji.PACKAGES[name][0]
  path = str(tmp_path / npm_fetch.tarball_name(name, version))
  with tarfile.open(path, "w:gz") as archive:
    archive.add(fixture_roots()[name], arcname="package")
    if extra is not None:
      archive.addfile(extra)
  return path


def _fake_npm(tmp_path, tarballs: dict[str, str]) -> str:
  """A folder holding an `npm` whose `pack name@version` copies the prepared tarball into the
  current folder and logs the call."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  script = bin_dir / "npm"
  script.write_text(
    f"#!{sys.executable}\n"
    "import json, os, shutil, sys\n"
    f"tarballs = json.loads({json.dumps(json.dumps(tarballs))})\n"
    f"open({str(tmp_path / 'npm.log')!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
    "name = sys.argv[2].rsplit('@', 1)[0]\n"
    "if name not in tarballs: sys.exit('npm error 404 Not Found - ' + name)\n"
    "shutil.copy(tarballs[name], os.getcwd())\n"
  )
  script.chmod(script.stat().st_mode | stat.S_IEXEC)
  return str(bin_dir)


def test_fetch_unpacks_checks_and_reuses(tmp_path, monkeypatch):
  name = "emoji-datasource-google"
  made = tmp_path / "made"
  made.mkdir()
  tarball = _tarball(made, name)
  pins = {name: (emoji.PACKAGES[name][0], npm_fetch._sha256(tarball))}
  monkeypatch.setenv("PATH", _fake_npm(tmp_path, {name: tarball}))
  roots = npm_fetch.fetch(pins, str(tmp_path / "dl"))
  assert os.path.isfile(os.path.join(roots[name], "emoji.json"))
  assert npm_fetch.unpacked_sha256(os.path.dirname(roots[name])) == pins[name][1]
  assert (tmp_path / "npm.log").read_text().split() == ["pack", f"{name}@16.0.0", "--silent"]
  # Fetched once: a second call reads the folder and runs no npm.
  assert npm_fetch.fetch(pins, str(tmp_path / "dl")) == roots
  assert len((tmp_path / "npm.log").read_text().splitlines()) == 1


def test_fetch_refuses_a_changed_tarball(tmp_path, monkeypatch):
  name = "cldr-annotations-full"
  tarball = _tarball(tmp_path, name)
  monkeypatch.setenv("PATH", _fake_npm(tmp_path, {name: tarball}))
  pins = {name: (emoji.PACKAGES[name][0], "0" * 64)}
  with pytest.raises(
    UserError,
    match=r"cldr-annotations-full@48.2.0: SHA-256 [0-9a-f]{64} "
    r"differs from the pinned 0{64}",
  ):
    npm_fetch.fetch(pins, str(tmp_path / "dl"))
  assert os.listdir(tmp_path / "dl") == []


def test_fetch_errors_name_the_package(tmp_path, monkeypatch):
  monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
  with pytest.raises(UserError, match="npm not found: .* emoji-datasource-google@16.0.0"):
    npm_fetch.fetch(
      {"emoji-datasource-google": emoji.PACKAGES["emoji-datasource-google"]}, str(tmp_path / "dl")
    )
  monkeypatch.setenv("PATH", _fake_npm(tmp_path, {}))
  with pytest.raises(UserError, match="npm pack no-such-pkg@1.0.0 failed: npm error 404"):
    npm_fetch.fetch({"no-such-pkg": ("1.0.0", "0" * 64)}, str(tmp_path / "dl"))


def test_fetch_refuses_entries_outside_the_folder(tmp_path, monkeypatch):
  name = "cldr-annotations-full"
  evil = tarfile.TarInfo("../escaped.txt")
  made = tmp_path / "made"
  made.mkdir()
  tarball = _tarball(made, name, extra=evil)
  monkeypatch.setenv("PATH", _fake_npm(tmp_path, {name: tarball}))
  pins = {name: (emoji.PACKAGES[name][0], npm_fetch._sha256(tarball))}
  with pytest.raises(UserError, match="unsafe entry '../escaped.txt'"):
    npm_fetch.fetch(pins, str(tmp_path / "dl"))
  assert not (tmp_path / "escaped.txt").exists()
  assert not os.path.isdir(tmp_path / "dl" / f"{name}-48.2.0")


def test_prepare_emoji_from_fetched_packages(tmp_path):
  """The prepare stage with configs/emoji.py on the fixture packages, already "fetched" (their
  folders carry the real pins), writes the records and the source's pseudo queries."""
  download = tmp_path / "dl"
  shutil.copytree(FIXTURES, download)
  workdir = str(tmp_path / "w")
  config = config_lib.load_config(
    "configs/emoji.py:tiny", [f"data.download_dir={download}", "text_tokenizer.vocab_size=60"]
  )
  prepare.run(config, workdir)
  info = json.loads((tmp_path / "w" / "prepared" / "dataset_info.json").read_text())
  assert info["dataset"] == "emoji"
  assert sum(s["num_images"] for s in info["splits"].values()) == 25
  lines = (tmp_path / "w" / "prepared" / "pseudo_queries.jsonl").read_text().splitlines()
  pairs = [json.loads(line) for line in lines]
  assert [(p["image_id"], p["query"]) for p in pairs] == emoji.build(
    fixture_roots(), 1
  ).pseudo_queries
  _, texts = dataset.read_texts(workdir, "test")
  assert texts == [e.captions[0] for e in emoji.build(fixture_roots(), 1).entries["test"]]
