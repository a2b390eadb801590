"""The live index through the Retriever and `avg-jax index`, on the tiny pipeline's export:
an added image is embedded and tokenized exactly as the pipeline did, is found by search,
disappears when removed, survives a reload; a writer killed with SIGKILL before its switch
leaves the previous index; a second writer is refused; a bad image is a one-line error."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from helpers import one_device_env

from avg_jax import cli
from avg_jax.artifacts import embeddings as embeddings_lib
from avg_jax.artifacts import voken_tables
from avg_jax.data import dataset
from avg_jax.decoding.config import ADDED_KEYS, DecodeConfig
from avg_jax.errors import UserError
from avg_jax.inference import live_index as live_lib
from avg_jax.inference.retriever import Retriever


@pytest.fixture
def export(serve_export, tmp_path):
  """A private copy of the tiny export (each test changes its own)."""
  target = tmp_path / "export"
  shutil.copytree(serve_export, target)
  return str(target)


def _records(workdir, split):
  source = dataset.image_source(str(workdir), split, decode_image=False)
  return [source[i] for i in range(len(source))]


def test_added_images_get_the_pipelines_embeddings_and_codes(export, pipeline_workdir):
  # Val images: not in the export's (test) index. The live road (prepare's storage, the
  # embed stage's crop, the frozen tokenizer) must give the embed and tokenize stages' output.
  retriever = Retriever.load(export)
  records = _records(pipeline_workdir, "val")[:6]
  ids = np.array([int(r["image_id"]) for r in records])
  emb, semantic, _ = retriever.embed_images([bytes(r["image"]) for r in records])
  stored = embeddings_lib.load(str(pipeline_workdir), "val")
  row = {int(i): n for n, i in enumerate(stored["image_ids"])}
  np.testing.assert_allclose(emb, stored["image_emb"][[row[int(i)] for i in ids]], atol=1e-4)
  name = retriever.manifest["live"]["tokenizer"]
  _, table, _ = voken_tables.load(str(pipeline_workdir), name)
  trow = {int(i): n for n, i in enumerate(table["val"][0])}
  levels = retriever.vocab.num_levels
  np.testing.assert_array_equal(semantic, table["val"][1][[trow[int(i)] for i in ids]][:, :levels])
  assert retriever.manifest["live"]["code_agreement"] == 1.0


def test_add_then_search_finds_it_remove_then_it_is_gone(export, pipeline_workdir):
  retriever = Retriever.load(export)
  records = {int(r["image_id"]): r for r in _records(pipeline_workdir, "test")}
  # Find indexed images that their own captions retrieve (the tiny generator is weak).
  found = {}
  for image_id, r in records.items():
    ids, scores = retriever.search(list(r["captions"][:2]), k=5)
    for row_ids, row_scores, caption in zip(ids, scores, r["captions"]):
      if image_id in row_ids:
        found[image_id] = (caption, float(row_scores[list(row_ids).index(image_id)]))
    if len(found) >= 2:
      break
  assert found, "the tiny generator retrieves none of its test images by caption"
  ((original, (caption, score)),) = list(found.items())[:1]
  # The same picture added under a new id: same embedding, same codes, so the search must
  # rank the copy beside the original with the same score (tie-break by similarity).
  new_id = 10_000_000
  added = retriever.add(
    [bytes(records[original]["image"])],
    ids=[new_id],
    captions=[["a copy"]],
    file_names=["copy.png"],
  )
  assert added.tolist() == [new_id]
  ids, scores = retriever.search([caption], k=6)
  assert new_id in ids[0] and original in ids[0], ids
  assert scores[0][list(ids[0]).index(new_id)] == pytest.approx(score, abs=1e-4)
  assert retriever.file_name(new_id) == "copy.png"
  assert retriever.added_captions(new_id) == ["a copy"]
  assert retriever.live_thumbnail(new_id)[1] == "image/png"
  # A reloaded retriever sees the change (it is on disk, version 1).
  again = Retriever.load(export)
  assert again.state.live.version == 1 and new_id in again.image_ids
  np.testing.assert_array_equal(again.search([caption], k=6)[0], ids)
  with pytest.raises(UserError, match=f"image id {new_id} is already indexed"):
    retriever.add([bytes(records[original]["image"])], ids=[new_id])
  # Removed: never in any result again, here and after a reload.
  retriever.remove([original])
  queries = [c for r in list(records.values())[:20] for c in r["captions"][:1]] + [caption]
  for r in (retriever, Retriever.load(export)):
    ids, _ = r.search(queries, k=6)
    assert original not in ids and new_id in ids[-1]
    assert original not in r.image_ids
  with pytest.raises(UserError, match="image id 123456789 is not in the index"):
    retriever.remove([123456789])
  with pytest.raises(UserError, match=f"image id {original} is not in the index"):
    retriever.remove([original])


def test_adding_needs_an_export_that_carries_the_encoder_and_tokenizer(export):
  retriever = Retriever.load(export)
  retriever.manifest = {k: v for k, v in retriever.manifest.items() if k != "live"}
  with pytest.raises(UserError, match="this export cannot add images"):
    retriever.add([b"\x89PNG"])


def test_an_old_manifests_decode_gets_the_documented_defaults(export):
  """A manifest written before the keys of `ADDED_KEYS` existed loads with the behaviour it
  had: learned tie-break, full-vocabulary scores, the vocabulary's P positions."""
  retriever = Retriever.load(export)
  decode = retriever.manifest["decode"]
  assert DecodeConfig.from_dict(decode) == retriever.decode  # the round trip is exact
  old = {k: v for k, v in decode.items() if k not in ADDED_KEYS}
  again = Retriever(
    params=retriever.params,
    cfg=retriever.cfg,
    vocab=retriever.vocab,
    live=retriever.state.live,
    tokenizer=retriever.tokenizer,
    manifest=dict(retriever.manifest, decode=old),
    directory=export,
  )
  p = retriever.vocab.id_length
  assert again.trained_length == p
  assert again.decode == DecodeConfig(
    beam_size=decode["beam_size"],
    top_k=decode["top_k"],
    mask_mode=decode["mask_mode"],
    batch_size=decode["batch_size"],
    trained_length=p,
  )
  ids, _ = again.search(["a red circle"], k=1)
  assert ids.shape == (1, 1)


def _png(pipeline_workdir, tmp_path, n=1):
  paths = []
  for r in _records(pipeline_workdir, "val")[:n]:
    path = tmp_path / f"new_{int(r['image_id'])}.png"
    path.write_bytes(bytes(r["image"]))
    paths.append(str(path))
  return paths


def _paused_writer(repo_root, export, image):
  """`avg-jax index add` that stops between writing its version and switching to it."""
  env = one_device_env(
    AVG_JAX_NO_PROGRESS="1",
    **{live_lib.PAUSE_ENV: "300"},
    PYTHONPATH=str(repo_root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  proc = subprocess.Popen(
    [sys.executable, "-m", "avg_jax", "index", "add", "--model", export, image],
    cwd=repo_root,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  lines = []
  for line in proc.stdout:  # blocks until the writer reaches the pause (or exits)
    lines.append(line)
    if line.startswith("live index: v1 written"):
      return proc
  raise AssertionError(f"writer exited {proc.wait()} before its pause:\n" + "".join(lines))


def test_kill_9_before_the_switch_leaves_the_previous_index(
  export, repo_root, pipeline_workdir, tmp_path
):
  before = Retriever.load(export)
  (image,) = _png(pipeline_workdir, tmp_path)
  proc = _paused_writer(repo_root, export, image)
  try:
    assert os.path.isfile(os.path.join(export, "live", "v1", "delta.npz"))
    # Meanwhile another writer is refused with a clear error.
    with pytest.raises(UserError, match="another process is changing this index"):
      Retriever.load(export).add([image])
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  after = Retriever.load(export)  # the version before the killed add
  assert after.state.live.version == 0
  np.testing.assert_array_equal(after.image_ids, before.image_ids)
  # The lock died with the writer; the next add never overwrites a version folder: it
  # writes v2, then removes the half-written v1 (never committed).
  added = after.add([image])
  assert Retriever.load(export).state.live.version == 2
  assert added[0] in Retriever.load(export).image_ids
  assert not os.path.exists(os.path.join(export, "live", "v1"))


def test_cli_add_remove_list_and_a_bad_image(export, pipeline_workdir, tmp_path, capsys):
  good = _png(pipeline_workdir, tmp_path, n=2)
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"not an image")
  assert cli.main(["index", "add", "--model", export, *good, str(bad)]) == 2
  err = capsys.readouterr().err.strip()
  assert err == (
    f"avg-jax: error: 1 of 3 images cannot be used: {bad}: not an image in a "
    f"format avg-jax reads (PNG, JPEG, WebP, GIF, BMP or SVG)"
  )
  assert not os.path.exists(os.path.join(export, "live", "CURRENT"))  # nothing changed
  assert cli.main(["index", "add", "--model", export, str(tmp_path)]) == 2  # folder with bad
  capsys.readouterr()
  bad.unlink()
  assert cli.main(["index", "add", "--model", export, str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert out.startswith("index: added 2 images")
  num_base = len(Retriever.load(export).state.live.base_ids)
  assert cli.main(["index", "remove", "--model", export, "nope"]) == 2
  assert "'nope' is not an image id (decimal digits 0-9)" in capsys.readouterr().err
  first_base = int(Retriever.load(export).state.live.base_ids[0])
  assert cli.main(["index", "remove", "--model", export, str(first_base)]) == 0
  capsys.readouterr()
  assert cli.main(["index", "list", "--model", export]) == 0
  out = capsys.readouterr().out
  assert out.splitlines()[0] == (
    f"version 2: {num_base + 1} images indexed = {num_base} at export + 2 added - 1 removed"
  )


def test_cli_adds_a_karpathy_file_with_ids_and_captions(export, karpathy_files, tmp_path, capsys):
  json_path, image_root = karpathy_files(tmp_path, corrupt=True)
  # A bad entry in the chosen images stops the add, naming the file (as prepare does).
  assert (
    cli.main(
      ["index", "add", "--model", export, "--karpathy", json_path, "--images-dir", image_root]
    )
    == 2
  )
  assert "broken.jpg: not an image in a format avg-jax reads" in capsys.readouterr().err
  assert (
    cli.main(
      [
        "index",
        "add",
        "--model",
        export,
        "--karpathy",
        json_path,
        "--images-dir",
        image_root,
        "--split",
        "test",
      ]
    )
    == 0
  )
  capsys.readouterr()
  retriever = Retriever.load(export)
  entries = [e for e in json.loads(open(json_path).read())["images"] if e["split"] == "test"]
  assert [e["imgid"] for e in entries] == retriever.state.live.delta_ids.tolist()
  for e in entries:
    assert retriever.added_captions(e["imgid"]) == [s["raw"].strip() for s in e["sentences"]]
    assert retriever.file_name(e["imgid"]) == e["filename"]
