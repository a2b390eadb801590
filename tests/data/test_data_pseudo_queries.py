"""Pseudo queries: generated ones never copy an evaluation caption; user files are checked."""

import json
import re

import numpy as np
import pytest

from avg_jax.data import pseudo_queries, shapes
from avg_jax.errors import UserError


def _scenes(split, n):
  return list(shapes.generate(split, n, 32, seed=0))


def test_generated_pseudo_queries_never_equal_an_evaluation_caption():
  captions, queries = set(), []
  for split in ("val", "test"):
    for example in _scenes(split, 300):
      captions.update(example["captions"])
      queries += shapes.pseudo_queries(
        example["attributes"], shapes.pseudo_query_rng(0, split, example["index"]), 5
      )
  assert len(queries) == 3000
  assert not captions & set(queries)
  # Why it holds: every pseudo query uses a word that no caption template uses.
  caption_words = {w for c in captions for w in re.findall(r"[a-z]+", c)}
  assert not caption_words & set(shapes.PSEUDO_MARKERS)
  for q in queries:
    assert set(re.findall(r"[a-z]+", q)) & set(shapes.PSEUDO_MARKERS), q


def test_pseudo_queries_are_a_different_imperfect_phrasing():
  examples = _scenes("test", 200)
  wrong_colour = partial = 0
  for example in examples:
    objects = json.loads(example["attributes"])["objects"]
    colours = {o["color"] for o in objects}
    synonyms = {c: {c, *shapes._COLOR_SYNONYMS[c][1:]} for c in shapes.COLORS}
    named_ok = set().union(*(synonyms[c] for c in colours))
    all_colour_words = set().union(*synonyms.values())
    for q in shapes.pseudo_queries(
      example["attributes"], shapes.pseudo_query_rng(0, "test", example["index"]), 5
    ):
      words = set(re.findall(r"[a-z]+", q))
      wrong_colour += bool((words & all_colour_words) - named_ok)
      partial += sum(bool(words & synonyms[c]) for c in colours) < len(colours)
  n = 5 * len(examples)
  # A stated share is wrong (colour errors are a third of the errors) and many queries leave
  # objects out, as a real captioner would.
  assert 0.01 * n < wrong_colour < 0.15 * n
  assert partial > 0.2 * n


def test_pseudo_queries_depend_only_on_the_image():
  a = _scenes("val", 20)[7]
  b = list(shapes.generate("val", 20, 32, seed=0, start=7))[0]
  qa = shapes.pseudo_queries(a["attributes"], shapes.pseudo_query_rng(0, "val", 7), 5)
  qb = shapes.pseudo_queries(b["attributes"], shapes.pseudo_query_rng(0, "val", 7), 5)
  assert qa == qb
  assert qa != shapes.pseudo_queries(a["attributes"], shapes.pseudo_query_rng(1, "val", 7), 5)


def test_user_file_errors_name_file_and_line(tmp_path):
  good = tmp_path / "q.jsonl"
  good.write_text('{"image_id": 3, "query": "a red circle"}\n\n{"image_id": 4, "query": " x "}\n')
  assert pseudo_queries.read_user_file(str(good), {3, 4}) == [(3, "a red circle"), (4, "x")]
  cases = {
    "bad.jsonl": ('{"image_id": 3, "query": "ok"}\nnot json\n', r"bad.jsonl:2: expected"),
    "key.jsonl": ('{"id": 3, "query": "ok"}\n', r"key.jsonl:1: expected"),
    "type.jsonl": ('{"image_id": "3", "query": "ok"}\n', r"type.jsonl:1: image_id must be"),
    "empty.jsonl": ('{"image_id": 3, "query": "  "}\n', r"empty.jsonl:1: query must be"),
    "unknown.jsonl": (
      '{"image_id": 9, "query": "q"}\n',
      r"unknown.jsonl:1: image id 9 is not an image of the dataset",
    ),
  }
  for name, (text, message) in cases.items():
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=message):
      pseudo_queries.read_user_file(str(tmp_path / name), {3})
  (tmp_path / "latin1.jsonl").write_bytes(b'{"image_id": 3, "query": "caf\xe9"}\n')
  with pytest.raises(UserError, match="latin1.jsonl: not valid UTF-8"):
    pseudo_queries.read_user_file(str(tmp_path / "latin1.jsonl"), {3})
  with pytest.raises(UserError, match="data.pseudo_queries: file not found"):
    pseudo_queries.read_user_file(str(tmp_path / "none"), {3})


def test_written_file_reads_back_and_filters_by_image(tmp_path):
  path = str(tmp_path / "p.jsonl")
  assert pseudo_queries.write(path, [(1, "a"), (2, "b"), (1, "c")]) == 3
  ids, queries = pseudo_queries.read(path)
  np.testing.assert_array_equal(ids, [1, 2, 1])
  assert queries == ["a", "b", "c"]
  ids, queries = pseudo_queries.read(str(tmp_path / "absent.jsonl"))
  assert ids.shape == (0,) and queries == []
  with pytest.raises(UserError, match="config key protocol must be one of"):
    pseudo_queries.check_protocol("both")
