"""Identifiers: collision rate, disambiguation (unique, stable), and every id scheme's validity."""

import jax
import numpy as np
import pytest

from avg_jax.errors import UserError
from avg_jax.tokenizer import hkmeans, ids
from avg_jax.vokens import VokenVocabulary


def test_collision_rate_hand_example():
  codes = np.array([[1, 2], [1, 2], [1, 3], [0, 0], [1, 2], [0, 1]])
  # Rows 0, 1, 4 share (1, 2); the others are alone.
  assert ids.collision_rate(codes) == pytest.approx(3 / 6)
  assert ids.collision_rate(np.array([[0], [1]])) == 0.0
  assert ids.collision_rate(np.zeros((0, 2), int)) == 0.0


def test_disambiguation_orders_groups_by_image_id():
  codes = np.array([[1, 2], [1, 2], [1, 3], [1, 2]])
  image_ids = np.array([30, 10, 5, 20])
  out, d = ids.disambiguate(codes, image_ids)
  assert d == 3
  # (1, 2) group sorted by id: 10 -> 0, 20 -> 1, 30 -> 2; the lone (1, 3) gets 0.
  np.testing.assert_array_equal(out, [[1, 2, 2], [1, 2, 0], [1, 3, 0], [1, 2, 1]])


def test_disambiguation_is_unique_and_stable_under_row_order():
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 3, size=(200, 2))
  image_ids = rng.permutation(1000)[:200]
  out, d = ids.disambiguate(codes, image_ids)
  assert len(np.unique(out, axis=0)) == 200
  assert d == max(np.unique(codes, axis=0, return_counts=True)[1])
  perm = rng.permutation(200)
  out_perm, d_perm = ids.disambiguate(codes[perm], image_ids[perm])
  assert d_perm == d
  np.testing.assert_array_equal(out_perm, out[perm])  # same image -> same identifier
  ids.check_identifiers(out, (3, 3, d))


def test_no_collision_means_no_extra_position():
  codes = np.array([[0, 1], [1, 0]])
  out, d = ids.disambiguate(codes, np.array([4, 2]))
  assert d == 0 and out.shape == (2, 2)


def test_disambiguation_rejects_repeated_ids():
  with pytest.raises(UserError):
    ids.disambiguate(np.array([[0], [0]]), np.array([1, 1]))


def test_atomic_codes_are_base_k_ranks():
  out = ids.atomic_codes(np.array([107, 3, 42]), codebook_size=10, num_levels=3)
  # Ranks by id: 3 -> 0, 42 -> 1, 107 -> 2.
  np.testing.assert_array_equal(out, [[0, 0, 2], [0, 0, 0], [0, 0, 1]])
  big = ids.atomic_codes(np.arange(1000) * 3, codebook_size=10, num_levels=3)
  np.testing.assert_array_equal(big[437], [4, 3, 7])
  with pytest.raises(UserError, match="atomic"):
    ids.atomic_codes(np.arange(1001), codebook_size=10, num_levels=3)


def test_random_codes_are_stable():
  image_ids = np.array([5, 1, 9, 7])
  a = ids.random_codes(image_ids, 16, 3, seed=0)
  b = ids.random_codes(image_ids[::-1], 16, 3, seed=0)
  np.testing.assert_array_equal(a, b[::-1])
  assert not np.array_equal(a, ids.random_codes(image_ids, 16, 3, seed=1))
  assert a.min() >= 0 and a.max() < 16


def test_check_identifiers_catches_each_problem():
  ok = np.array([[0, 1], [1, 1]])
  ids.check_identifiers(ok, (2, 2))
  with pytest.raises(ValueError, match="shape"):
    ids.check_identifiers(ok, (2, 2, 2))
  with pytest.raises(ValueError, match="outside"):
    ids.check_identifiers(np.array([[0, 2]]), (2, 2))
  with pytest.raises(ValueError, match="duplicate"):
    ids.check_identifiers(np.array([[0, 1], [0, 1]]), (2, 2))


def _hkmeans_codes(x, image_ids, k, levels):
  tree = hkmeans.fit(jax.random.key(0), x, image_ids, k, levels, iters=5)
  return tree, hkmeans.assign(tree, x)


def test_hkmeans_groups_nearby_points_and_leaves_are_members():
  rng = np.random.default_rng(1)
  # 3 blobs, each of 3 sub-blobs of 2 points: level 0 separates blobs, level 1 (6 > K members)
  # runs k-means again and separates sub-blobs, level 2 leaves (2 <= K) take each member.
  centers = np.array([[0, 0], [100, 0], [0, 100]], np.float32)
  offsets = np.array([[0, 0], [10, 0], [0, 10]], np.float32)
  x = np.concatenate(
    [c + o + rng.normal(size=(2, 2)) * 0.1 for c in centers for o in offsets]
  ).astype(np.float32)
  image_ids = np.arange(18)
  tree, codes = _hkmeans_codes(x, image_ids, k=3, levels=3)
  assert all(len(set(codes[i * 6 : (i + 1) * 6, 0])) == 1 for i in range(3))
  assert len(set(codes[::6, 0])) == 3
  assert all(len(set(map(tuple, codes[i * 2 : (i + 1) * 2, :2]))) == 1 for i in range(9))
  assert len(np.unique(codes, axis=0)) == 18
  # A new point next to a training point follows its path.
  np.testing.assert_array_equal(hkmeans.assign(tree, x[4:5] + 1e-3), codes[4:5])


def test_hkmeans_small_groups_take_members_in_id_order():
  x = np.array([[0.0], [1.0], [2.0]], np.float32)
  tree, codes = _hkmeans_codes(x, np.array([30, 10, 20]), k=4, levels=2)
  # 3 <= K members: each is its own child, ranked by image id (10, 20, 30); level 1 is 0.
  np.testing.assert_array_equal(codes, [[2, 0], [0, 0], [1, 0]])


def test_hkmeans_level_codebook_rows():
  x = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0]], np.float32)
  codes = np.array([[0, 0], [0, 1], [1, 0]])
  fill = np.full((4, 2), -7.0, np.float32)
  rows = hkmeans.level_codebook(x, codes, 2, fill)
  # Level 0 rows: means of x; level 1 rows: means of x minus the level-0 group mean.
  np.testing.assert_allclose(rows[0], [1.0, 0.0])
  np.testing.assert_allclose(rows[1], [10.0, 10.0])
  # Level 1 code 0: residuals (-1, 0) and (0, 0) -> (-0.5, 0); code 1: (1, 0).
  np.testing.assert_allclose(rows[2], [-0.5, 0.0])
  np.testing.assert_allclose(rows[3], [1.0, 0.0])


@pytest.mark.parametrize("scheme", ["hkmeans", "atomic", "random"])
def test_every_scheme_gives_valid_unique_identifiers(scheme):
  rng = np.random.default_rng(2)
  n, k, levels = 150, 6, 3
  image_ids = rng.permutation(10 * n)[:n]
  x = rng.normal(size=(n, 5)).astype(np.float32)
  if scheme == "hkmeans":
    _, codes = _hkmeans_codes(x, image_ids, k, levels)
  elif scheme == "atomic":
    codes = ids.atomic_codes(image_ids, k, levels)
  else:
    codes = ids.random_codes(image_ids, k, levels, seed=0)
  final, d = ids.disambiguate(codes, image_ids)
  vocab = VokenVocabulary(
    text_vocab_size=10,
    codebook_size=k,
    num_levels=levels,
    shared_codebook=False,
    disambiguation_size=d,
  )
  final = vocab.validate_codes(final)
  ids.check_identifiers(final, vocab.position_sizes())
  if scheme == "atomic":
    assert d == 0  # unique by construction: no extra position


def test_identifiers_are_unique_within_each_index_and_ignore_other_splits():
  # Test image 11 shares its codes with training image 1. Disambiguated over all splits
  # together it would get index 1 (the generator only ever saw index 0 for those codes);
  # within its own index it is the first image with them.
  codes = {
    "train": np.array([[1, 2], [1, 2], [0, 0]]),
    "test": np.array([[1, 2], [3, 3]]),
    "val": np.array([[3, 3], [3, 3]]),
  }
  image_ids = {"train": np.array([0, 1, 2]), "test": np.array([11, 12]), "val": np.array([21, 20])}
  out, d = ids.disambiguate_per_index(codes, image_ids)
  assert d == 3  # the largest group over all images together: (1, 2) x 3, (3, 3) x 3
  assert out["train"].tolist() == [[1, 2, 0], [1, 2, 1], [0, 0, 0]]
  assert out["test"].tolist() == [[1, 2, 0], [3, 3, 0]]
  assert out["val"].tolist() == [[3, 3, 1], [3, 3, 0]]  # by image id within the group
  for split in codes:
    assert len(np.unique(out[split], axis=0)) == len(out[split])
  # Independent of the other splits: the test index alone gives the same identifiers.
  alone, _ = ids.disambiguate_per_index(
    {"test": codes["test"], "x": np.array([[1, 2], [1, 2]])},
    {"test": image_ids["test"], "x": np.array([5, 6])},
  )
  assert alone["test"].tolist() == out["test"].tolist()
  # No collision anywhere: the codes unchanged, no extra position.
  plain, d = ids.disambiguate_per_index(
    {"a": np.array([[0, 1]]), "b": np.array([[1, 0]])}, {"a": np.array([0]), "b": np.array([1])}
  )
  assert d == 0 and plain["a"].tolist() == [[0, 1]]
  with pytest.raises(UserError, match="unique across the indexes"):
    ids.disambiguate_per_index(
      {"a": np.array([[0]]), "b": np.array([[1]])}, {"a": np.array([4]), "b": np.array([4])}
    )
