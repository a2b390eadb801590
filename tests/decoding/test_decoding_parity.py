"""Parity with the reference: Hugging Face `generate` + a Python dict trie (golden fixtures
from tests/make_decode_fixtures.py), on tiny random T5 v1.0 and v1.1 models imported with
avg_jax/models/t5_hf.py. Same identifiers in the same order; our summed scores equal HF's
`sequences_scores * (P + 1)`."""

import pathlib

import numpy as np
import pytest

from avg_jax.decoding import search
from avg_jax.decoding.trie import VokenTrie
from avg_jax.models import t5_hf
from avg_jax.vokens import VokenVocabulary

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "fixtures"


def load(name):
  data = dict(np.load(FIXTURES / f"decode_{name}.npz"))
  vocab = VokenVocabulary(
    text_vocab_size=int(data["text_vocab"]),
    codebook_size=int(data["codebook"]),
    num_levels=int(data["levels"]),
    shared_codebook=bool(data["shared"]),
    disambiguation_size=int(data["disambiguation"]),
  )
  cfg, params = t5_hf.load_hf_t5(
    str(FIXTURES / f"decode_{name}"), num_voken_tokens=vocab.num_voken_tokens
  )
  np.testing.assert_array_equal(vocab.position_offsets(), data["position_offsets"])
  return data, vocab, cfg, params


@pytest.mark.parametrize("name", ["v10", "v11"])
@pytest.mark.parametrize("trie_name", ["big", "small"])
def test_matches_hugging_face_generate(name, trie_name):
  data, vocab, cfg, params = load(name)
  p = vocab.id_length
  codes = data[f"{trie_name}_codes"]
  ids = np.arange(len(codes)) * 3 + 100
  trie = VokenTrie.build(codes, ids, vocab.position_sizes())
  device_trie = trie.to_device(1)
  id_of = {tuple(c): i for c, i in zip(codes.tolist(), ids.tolist())}
  for beam in (1, 5, 10):
    hf_codes = data[f"{trie_name}_beam{beam}_codes"]
    hf_scores = data[f"{trie_name}_beam{beam}_scores"].astype(np.float64)
    r = search.results_to_numpy(
      search.constrained_search(
        params, cfg, device_trie, vocab, data["input_tokens"], beam_size=beam
      )
    )
    for q in range(hf_codes.shape[0]):
      real = hf_scores[q] > -1e6  # HF's leaked -1e9 beams when leaves < beams
      n = int(real.sum())
      assert real[:n].all()
      assert r["codes"][q, :n].tolist() == hf_codes[q, :n].tolist(), (beam, q)
      np.testing.assert_allclose(
        r["scores"][q, :n], hf_scores[q, :n] * (p + 1), rtol=1e-5, atol=1e-5
      )
      assert r["item_ids"][q, :n].tolist() == [id_of[tuple(c)] for c in hf_codes[q, :n]]
      # beyond the real hypotheses: explicit empty slots, never a duplicate or a -1e9 score
      assert (r["item_ids"][q, n:] == -1).all() and (r["scores"][q, n:] == -np.inf).all()
      assert n == min(beam, len(codes))
