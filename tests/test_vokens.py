"""The voken <-> token id layout, checked by hand."""

import numpy as np
import pytest

from avg_jax.errors import UserError
from avg_jax.vokens import EOS_ID, VokenVocabulary


def test_shared_codebook_layout():
  v = VokenVocabulary(text_vocab_size=100, codebook_size=8, num_levels=3)
  assert v.num_voken_tokens == 8 and v.total_vocab_size == 108 and v.id_length == 3
  tokens = v.codes_to_tokens(np.array([[0, 7, 3]]))
  np.testing.assert_array_equal(tokens, [[100, 107, 103]])
  np.testing.assert_array_equal(v.tokens_to_codes(tokens), [[0, 7, 3]])


def test_per_level_layout_with_disambiguation():
  v = VokenVocabulary(100, 8, 3, shared_codebook=False, disambiguation_size=4)
  # levels at 100, 108, 116; disambiguation tokens after the 24 level tokens, at 124.
  np.testing.assert_array_equal(v.position_offsets(), [100, 108, 116, 124])
  assert v.total_vocab_size == 128 and v.id_length == 4
  np.testing.assert_array_equal(
    v.target_tokens(np.array([[1, 2, 3, 0]])), [[101, 110, 119, 124, EOS_ID]]
  )
  assert VokenVocabulary.from_dict(v.to_dict()) == v


@pytest.mark.parametrize(
  "codes, message",
  [
    (np.zeros((2, 3), np.int32), r"expected shape \[N, 4\]"),
    (np.array([[0, 0, 8, 0]]), "code 8 at row 0, position 2 is outside"),
    (np.array([[0, 0, 0, 4]]), "code 4 at row 0, position 3 is outside"),
    (np.array([[0.0, 0, 0, 0]]), "expected integers"),
  ],
)
def test_validate_codes_errors(codes, message):
  v = VokenVocabulary(100, 8, 3, shared_codebook=False, disambiguation_size=4)
  with pytest.raises(UserError, match=message):
    v.validate_codes(codes)
