"""`avg-jax search` output and query decoding, with a stand-in Retriever (no export needed;
tests/stages/test_stages_pipeline.py runs the command on a real export)."""

import argparse
import json

import numpy as np
import pytest

from avg_jax.cli import search
from avg_jax.errors import UserError
from avg_jax.inference.retriever import Retriever


class FakeRetriever:
  """Two indexed images; the real `Retriever.validate` checks the queries."""

  max_query_chars = 100
  validate = Retriever.validate

  def __init__(self, captions=None):
    self.searched = []
    if captions is not None:
      self.caption = lambda image_id: captions.get(int(image_id), "")

  def search(self, queries, k=10):
    self.searched.append(list(queries))
    ids = np.array([[7, 3, -1]] * len(queries))[:, :k]
    scores = np.array([[-0.5, -1.25, -np.inf]] * len(queries))[:, :k]
    return ids, scores

  def file_name(self, image_id):
    return {7: "test/0007.png", 3: "test/0003.png"}.get(int(image_id), "")


def _run(monkeypatch, capsys, queries, retriever, *, as_json=False, k=3):
  monkeypatch.setattr(search.Retriever, "load", classmethod(lambda cls, d: retriever))
  args = argparse.Namespace(model="unused", queries=queries, k=k, json=as_json)
  assert search.main(args) == 0
  return capsys.readouterr().out


def test_text_output_names_files_scores_and_captions(monkeypatch, capsys):
  out = _run(
    monkeypatch,
    capsys,
    ["a red circle"],
    FakeRetriever({7: "a red circle on the left", 3: "a blue square"}),
  )
  assert out.splitlines() == [
    "query: a red circle",
    '    1. test/0007.png  score -0.5000  image 7  "a red circle on the left"',
    '    2. test/0003.png  score -1.2500  image 3  "a blue square"',
  ]
  out = _run(monkeypatch, capsys, ["x"], FakeRetriever())  # no captions in the export
  assert out.splitlines()[1] == "    1. test/0007.png  score -0.5000  image 7"


def test_json_output_has_file_names_and_captions_when_known(monkeypatch, capsys):
  out = _run(monkeypatch, capsys, ["q"], FakeRetriever({7: "seven"}), as_json=True)
  results = json.loads(out)["results"]
  assert results == [
    {"rank": 1, "image_id": 7, "file_name": "test/0007.png", "score": -0.5, "caption": "seven"},
    {"rank": 2, "image_id": 3, "file_name": "test/0003.png", "score": -1.25, "caption": ""},
  ]
  out = _run(monkeypatch, capsys, ["q"], FakeRetriever(), as_json=True)
  assert "caption" not in json.loads(out)["results"][0]


def test_command_line_query_that_is_not_utf8_is_a_user_error(monkeypatch, capsys):
  # How Python hands `avg-jax search $'\xff\xfe'` to argparse: bytes decoded with
  # surrogateescape. Before, the str went on to SentencePiece (TypeError).
  argv_query = b"ok \xff\xfe".decode("utf-8", errors="surrogateescape")
  with pytest.raises(UserError, match=r"^query 1: not valid UTF-8 \(byte 3\)$"):
    _run(monkeypatch, capsys, ["fine", argv_query], FakeRetriever())
  # Valid UTF-8 beyond ASCII on the command line still works.
  retriever = FakeRetriever()
  _run(monkeypatch, capsys, ["café"], retriever)
  assert retriever.searched == [["café"]]


def test_client_supplied_names_and_captions_are_escaped_on_the_terminal(monkeypatch, capsys):
  # Names and captions of images added through the service: a screen clear, a forged line,
  # a direction override; JSON keeps the text as it is.
  retriever = FakeRetriever({7: "pwned\x1b]0;title\x07", 3: "abc\u202edcba"})
  retriever.file_name = lambda image_id: {7: "a\x1b[2J.png", 3: "b.png\r\n  1. fake"}.get(
    int(image_id), ""
  )
  out = _run(monkeypatch, capsys, ["q\x9b"], retriever)
  assert "\x1b" not in out and "\r" not in out and "\u202e" not in out and "\x9b" not in out
  assert out.splitlines() == [
    "query: q\\x9b",
    '    1. a\\x1b[2J.png  score -0.5000  image 7  "pwned\\x1b]0;title\\x07"',
    '    2. b.png\\x0d\\x0a  1. fake  score -1.2500  image 3  "abc\\u202edcba"',
  ]
  out = _run(monkeypatch, capsys, ["q"], retriever, as_json=True)
  assert json.loads(out)["results"][0]["file_name"] == "a\x1b[2J.png"
