"""The protocols' training examples: transductive adds the indexed images' pseudo queries with
their own index's identifiers; inductive trains on the training captions alone."""

import shutil

import numpy as np

from avg_jax import config as config_lib
from avg_jax.data import dataset
from avg_jax.data import pseudo_queries as pseudo_lib
from avg_jax.stages import tokenize as tokenize_stage
from avg_jax.training import examples
from avg_jax.training import generator as generator_lib


def _config(repo_root, *overrides):
  return config_lib.load_config(str(repo_root / "configs/smoke.py:tiny"), list(overrides))


def _copy(tiny_workdir, tmp_path):
  """A writable copy of the tiny workdir, its training caption count and pseudo queries."""
  workdir = tmp_path / "w"
  shutil.copytree(tiny_workdir, workdir)
  captions = len(dataset.read_texts(str(workdir), "train")[1])
  return workdir, captions, *pseudo_lib.load(str(workdir))


def test_pseudo_queries_of_indexed_images_are_training_examples(repo_root, tiny_workdir, tmp_path):
  workdir, captions, pseudo_ids, queries = _copy(tiny_workdir, tmp_path)
  for protocol, repeats in (("transductive", 1), ("transductive", 2), ("inductive", 1)):
    config = _config(repo_root, f"protocol={protocol}", f"train.pseudo_query_repeats={repeats}")
    tokenize_stage.run(config, str(workdir))
    gen = generator_lib.load_generator(config, str(workdir), "avg")
    source = examples.training_source(config, str(workdir), gen)
    if protocol == "inductive":
      assert gen.training_splits() == ("train",)
      assert len(source) == captions
      continue
    assert set(gen.training_splits()) == {"train", "val", "test"}
    indexed = np.concatenate([gen.table[s][0] for s in ("val", "test")])
    mine = np.isin(pseudo_ids, indexed)
    assert mine.sum() == 5 * len(indexed)  # 5 per val / test image
    assert len(source) == captions + repeats * int(mine.sum())
    # Each pseudo query's target is its image's identifier in its own split's index.
    first = source[captions]
    image_id = int(pseudo_ids[mine][0])
    split = "val" if image_id in gen.table["val"][0] else "test"
    ids, targets = gen.targets(split)
    np.testing.assert_array_equal(first["targets"], targets[list(ids).index(image_id)])
    expected = gen.tokenizer.encode_batch(
      [np.asarray(queries)[mine][0]], config.text_tokenizer.max_length
    )[0]
    np.testing.assert_array_equal(first["inputs"], expected)


def test_training_images_pseudo_queries_when_asked_in_either_protocol(
  repo_root, tiny_workdir, tmp_path
):
  workdir, captions, pseudo_ids, queries = _copy(tiny_workdir, tmp_path)
  for protocol in ("inductive", "transductive"):
    config = _config(
      repo_root, f"protocol={protocol}", "train.pseudo_queries_of_training_images=true"
    )
    tokenize_stage.run(config, str(workdir))
    gen = generator_lib.load_generator(config, str(workdir), "avg")
    source = examples.training_source(config, str(workdir), gen)
    splits = ("train",) if protocol == "inductive" else ("train", "val", "test")
    mine = np.isin(pseudo_ids, np.concatenate([gen.table[s][0] for s in splits]))
    assert mine.sum() == 5 * sum(len(gen.table[s][0]) for s in splits)
    assert len(source) == captions + int(mine.sum())
    # Every training image's pseudo query is an example whose target is that image's
    # identifier in the training index (file order, after the captions).
    ids, targets = gen.targets("train")
    row = {int(i): r for r, i in enumerate(ids)}
    train_rows = np.flatnonzero(np.isin(pseudo_ids[mine], ids))
    assert len(train_rows) == 5 * len(ids)
    for k in train_rows[:3]:
      example, image_id = source[captions + int(k)], int(pseudo_ids[mine][k])
      np.testing.assert_array_equal(example["targets"], targets[row[image_id]])
      query = np.asarray(queries)[mine][k]
      np.testing.assert_array_equal(
        example["inputs"], gen.tokenizer.encode_batch([query], config.text_tokenizer.max_length)[0]
      )


def test_targets_follow_the_tie_break(repo_root, tiny_workdir):
  learned = generator_lib.load_generator(
    _config(repo_root, "decode.tie_break=learned"), str(tiny_workdir), "avg"
  )
  semantic = generator_lib.load_generator(
    _config(repo_root, "decode.tie_break=image_id"), str(tiny_workdir), "avg"
  )
  levels, p = learned.vocab.num_levels, learned.vocab.id_length
  assert (learned.trained_length, semantic.trained_length) == (p, levels)
  assert learned.targets("train")[1].shape[1] == p + 1
  assert semantic.targets("train")[1].shape[1] == levels + 1
  np.testing.assert_array_equal(
    semantic.targets("train")[1][:, :levels], learned.targets("train")[1][:, :levels]
  )
  assert learned.table_hash != semantic.table_hash  # checkpoints of one never resume the other
  trie = semantic.trie(["test"])
  assert trie.id_length == levels and trie.num_items == len(semantic.table["test"][0])
