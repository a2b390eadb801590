"""The SentencePiece text tokenizer: T5 ids, padding/EOS/truncation, the voken id range."""

import pickle

import numpy as np
import pytest
import sentencepiece as spm

from avg_jax.data import shapes
from avg_jax.data.text_tokenizer import TextTokenizer
from avg_jax.errors import UserError
from avg_jax.vokens import VokenVocabulary

CAPTIONS = [c for ex in shapes.generate("train", 200, 32, seed=0) for c in ex["captions"]]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "text.model"
  tok = TextTokenizer.train(CAPTIONS, 120, str(path), model_type="bpe")
  assert path.exists()
  return tok


def test_trained_tokenizer_has_t5_special_ids_and_exact_size(tokenizer):
  assert tokenizer.vocab_size == 120
  sp = spm.SentencePieceProcessor(model_proto=tokenizer.model_proto)
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)


def test_encode_batch_appends_eos_truncates_and_pads(tokenizer):
  texts = ["a small red circle", "a large blue square at the top left and a green cross", ""]
  ids = tokenizer.encode_batch(texts, 8)
  assert ids.shape == (3, 8) and ids.dtype == np.int32
  first = tokenizer.encode(texts[0])
  assert 0 < len(first) < 7
  np.testing.assert_array_equal(ids[0, : len(first) + 1], first + [1])
  assert (ids[0, len(first) + 1 :] == 0).all()
  second = tokenizer.encode(texts[1])
  assert len(second) > 7
  np.testing.assert_array_equal(ids[1], second[:7] + [1])  # EOS survives truncation
  np.testing.assert_array_equal(ids[2], [1, 0, 0, 0, 0, 0, 0, 0])
  assert tokenizer.decode(ids[0]) == texts[0]
  assert tokenizer.decode(tokenizer.encode_batch(texts[1:2], 64)[0]) == texts[1]


def test_ids_stay_below_vocab_size_and_vokens_start_right_after(tokenizer):
  ids = tokenizer.encode_batch(CAPTIONS, 40)
  assert ids.min() >= 0 and ids.max() < tokenizer.vocab_size
  assert ids.max() > tokenizer.vocab_size // 2  # the range is really used
  vocab = VokenVocabulary(
    text_vocab_size=tokenizer.vocab_size, codebook_size=16, num_levels=3, disambiguation_size=4
  )
  assert vocab.first_voken_id == tokenizer.vocab_size
  codes = np.array([[0, 0, 0, 0], [15, 15, 15, 3]])
  tokens = vocab.codes_to_tokens(codes)
  assert tokens.min() == tokenizer.vocab_size  # code 0 of level 0 is the first voken id
  assert tokens.max() == vocab.total_vocab_size - 1
  # Voken ids decode to nothing: they are not text.
  mixed = np.concatenate([tokenizer.encode_batch(["a red circle"], 6)[0, :3], tokens[1]])
  assert tokenizer.decode(mixed) == tokenizer.decode(mixed[:3])


def test_load_pickle_and_bad_models(tokenizer, tmp_path):
  path = tmp_path / "copy.model"
  path.write_bytes(tokenizer.model_proto)
  loaded = TextTokenizer.load(str(path))
  assert loaded.vocab_size == tokenizer.vocab_size
  restored = pickle.loads(pickle.dumps(loaded))
  np.testing.assert_array_equal(
    restored.encode_batch(CAPTIONS[:5], 20), tokenizer.encode_batch(CAPTIONS[:5], 20)
  )
  with pytest.raises(UserError, match="not readable: .*absent.model"):
    TextTokenizer.load(str(tmp_path / "absent.model"))
  (tmp_path / "junk.model").write_bytes(b"junk")
  with pytest.raises(UserError, match="junk.model: not a SentencePiece model"):
    TextTokenizer.load(str(tmp_path / "junk.model"))
  # A model with a BOS and other special ids than T5's is refused.
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(CAPTIONS),
    model_prefix=str(tmp_path / "bos"),
    vocab_size=60,
    model_type="bpe",
    minloglevel=2,
  )
  with pytest.raises(UserError, match=r"bos.model: SentencePiece ids pad/eos/unk/bos"):
    TextTokenizer.load(str(tmp_path / "bos.model"))


def test_too_large_vocabulary_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match=r"text_tokenizer.vocab_size=5000.*at most \d+"):
    TextTokenizer.train(CAPTIONS[:50], 5000, str(tmp_path / "t.model"), model_type="unigram")
  assert not (tmp_path / "t.model").exists()
