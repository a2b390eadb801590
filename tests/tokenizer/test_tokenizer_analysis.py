"""The semantic measure: attribute sets, Jaccard overlap, pairs sharing identifier prefixes."""

import json

import numpy as np
import pytest

from avg_jax.tokenizer import analysis


def test_attribute_set_of_a_scene():
  attrs = json.dumps(
    {
      "background": 3,
      "objects": [
        {"shape": "circle", "color": "red", "size": "small", "center_xy": [0.2, 0.5], "row": 0},
        {"shape": "square", "color": "red", "size": "large", "center_xy": [0.7, 0.5], "row": 1},
      ],
      "relations": [[0, "left of", 1]],
    }
  )
  assert analysis.attribute_set(attrs) == frozenset(
    {
      "objects=2",
      "shape=circle",
      "shape=square",
      "color=red",
      "size=small",
      "size=large",
      "object=red circle small",
      "object=red square large",
    }
  )


def test_attribute_set_flattens_other_json_and_skips_floats():
  attrs = json.dumps({"scene": {"weather": "rain", "temperature": 3.5, "people": [1, 2]}})
  assert analysis.attribute_set(attrs) == frozenset(
    {"scene.weather=rain", "scene.people=1", "scene.people=2"}
  )


def test_attribute_set_falls_back_to_caption_words():
  facts = analysis.attribute_set("", ["A red circle on the left.", "Two dogs, one RED."])
  assert facts == frozenset({"red", "circle", "left", "dogs"})


def test_jaccard():
  assert analysis.jaccard(frozenset("ab"), frozenset("bc")) == pytest.approx(1 / 3)
  assert analysis.jaccard(frozenset(), frozenset()) == 1.0


def test_prefix_pairs_hand_example():
  # Rows 0-2 share first code 0 (rows 0, 1 also the second); rows 3, 4 share code 1.
  codes = np.array([[0, 0], [0, 0], [0, 1], [1, 5], [1, 6]])
  a, b, c, d = (frozenset({x}) for x in "abcd")
  features = [a | b, a | b, a | c, d, d | c]
  result = analysis.semantic_similarity(
    codes, features, prefix_lengths=(1, 2), num_pairs=4000, seed=0
  )
  # Prefix 1 pairs (uniform over the 3 + 1 same-prefix pairs): (0,1) 1, (0,2) 1/3, (1,2) 1/3,
  # (3,4) 1/2 -> mean 13/24. Prefix 2: only (0, 1) -> 1.
  assert result["prefix_1"]["pairs"] == 4000
  assert result["prefix_1"]["similarity"] == pytest.approx(13 / 24, abs=0.02)
  assert result["prefix_2"]["similarity"] == 1.0
  # Random pairs, uniform over all 10: (0,1) 1, (0,2) (1,2) (2,4) 1/3, (3,4) 1/2, others 0.
  assert result["random"]["similarity"] == pytest.approx(2.5 / 10, abs=0.02)


def test_no_shared_prefix_gives_nan_with_zero_pairs():
  result = analysis.semantic_similarity(
    np.array([[0], [1]]), [frozenset(), frozenset()], prefix_lengths=(1,), num_pairs=5
  )
  assert result["prefix_1"]["pairs"] == 0 and np.isnan(result["prefix_1"]["similarity"])


def test_format_table():
  row = {
    "prefix_1": {"pairs": 3, "similarity": 0.5},
    "prefix_2": {"pairs": 1, "similarity": 1.0},
    "random": {"pairs": 9, "similarity": 0.25},
  }
  text = analysis.format_table({"avg": row})
  assert text.splitlines()[2] == "avg | 0.500 (3) | 1.000 (1) | 0.250"
