"""Both stages' losses against hand computations."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from avg_jax.training import losses


def test_token_cross_entropy_on_a_hand_made_batch():
  # 2 examples, 2 target positions, vocab 3; example 2's second position is padding (0).
  logits = jnp.array([[[0.0, 2.0, 0.0], [1.0, 1.0, 3.0]], [[0.0, 0.0, 4.0], [9.0, 9.0, 9.0]]])
  targets = jnp.array([[1, 2], [1, 0]])
  t = 2.0
  # With temperature 2: logits halve. Example 1 pos 1: softmax([0, 1, 0])[1].
  lp11 = 1.0 - math.log(2 + math.e)
  # Example 1 pos 2: [0.5, 0.5, 1.5] at index 2.
  lp12 = 1.5 - math.log(2 * math.exp(0.5) + math.exp(1.5))
  # Example 2 pos 1: [0, 0, 2] at index 1.
  lp21 = 0.0 - math.log(2 + math.exp(2))
  expected = -(lp11 + lp12 + lp21) / 3
  loss, acc, num = losses.token_cross_entropy(logits, targets, temperature=t)
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  # argmax: [1, 2] for example 1 (both right), 2 for example 2 (wrong, target 1).
  assert float(acc) == pytest.approx(2 / 3) and float(num) == 3


def test_listwise_loss_by_hand_and_double_softmax_differs():
  scores = jnp.array([[-1.0, -2.0, -3.0], [-2.0, -0.5, -7.0]])
  valid = jnp.array([[True, True, True], [True, True, False]])
  # Row 1: -log(e^-1 / (e^-1 + e^-2 + e^-3)); row 2 ignores the invalid -7 column.
  row1 = -(-1.0 - math.log(math.exp(-1) + math.exp(-2) + math.exp(-3)))
  row2 = -(-2.0 - math.log(math.exp(-2) + math.exp(-0.5)))
  loss = losses.listwise_softmax_loss(scores, valid)
  assert float(loss) == pytest.approx((row1 + row2) / 2, rel=1e-6)

  # The reference's double softmax: probabilities p go through log_softmax again, which
  # squeezes the loss towards log(n) since p lies in [0, 1].
  p1 = np.exp([-1.0, -2.0, -3.0])
  p1 /= p1.sum()
  p2 = np.exp([-2.0, -0.5])
  p2 /= p2.sum()
  d1 = -(p1[0] - math.log(np.exp(p1).sum()))
  d2 = -(p2[0] - math.log(np.exp(p2).sum()))
  double = losses.listwise_softmax_loss(scores, valid, double_softmax=True)
  assert float(double) == pytest.approx((d1 + d2) / 2, rel=1e-6)
  assert float(double) != pytest.approx(float(loss), rel=1e-2)
  # Probabilities lie in [0, 1], so the second softmax is nearly uniform: loss ~ log(n).
  assert abs(d2 - math.log(2)) < 0.5


def test_listwise_loss_gradient_pushes_positive_up():
  import jax

  scores = jnp.array([[-1.0, -0.5]])
  grad = jax.grad(lambda s: losses.listwise_softmax_loss(s, jnp.array([[True, True]])))(scores)
  assert grad[0, 0] < 0 < grad[0, 1]


def test_listwise_loss_temperature_by_hand():
  scores = jnp.array([[-1.0, -2.0, -3.0]])
  valid = jnp.ones((1, 3), bool)
  # T = 0.5 doubles every score: -log(e^-2 / (e^-2 + e^-4 + e^-6)).
  expected = -(-2.0 - math.log(math.exp(-2) + math.exp(-4) + math.exp(-6)))
  loss = losses.listwise_softmax_loss(scores, valid, temperature=0.5)
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  # The positive already leads: a sharper softmax makes its loss smaller.
  assert float(loss) < float(losses.listwise_softmax_loss(scores, valid))
