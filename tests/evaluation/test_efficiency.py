"""Distractor identifiers for the efficiency benchmark."""

import numpy as np
import pytest

from avg_jax.evaluation.efficiency import distractor_codes


def test_distinct_distractors_avoid_the_real_codes_and_each_other():
  real = np.array([[0, 0, 1], [3, 2, 1]])
  fake = distractor_codes(real, (4, 3, 2), 18, seed=1)
  assert fake.shape == (18, 3) and fake.dtype == np.int32
  assert (fake >= 0).all() and (fake < np.array([4, 3, 2])).all()
  every = np.concatenate([real, fake])
  assert len(np.unique(every, axis=0)) == 20
  np.testing.assert_array_equal(fake, distractor_codes(real, (4, 3, 2), 18, seed=1))
  with pytest.raises(ValueError, match="do not fit"):
    distractor_codes(real, (4, 3, 2), 21)


def test_semantic_distractors_may_repeat_beyond_the_space():
  fake = distractor_codes(np.zeros((1, 2), int), (3, 2), 100, seed=0, distinct=False)
  assert fake.shape == (100, 2) and len(np.unique(fake, axis=0)) == 6
