"""Tokenizer files in the real formats and sizes, made from a little text (for dry runs).

- `t5_sentencepiece`: a SentencePiece model with T5's layout: `num_pieces` pieces (32 000),
  pad 0 `<pad>`, eos 1 `</s>`, unk 2 `<unk>`, no bos. SentencePiece cannot train 32 000
  pieces on a few hundred captions, so a small unigram model is trained on the text and
  padded with synthetic pieces scored below every learned one (they only win on text that
  nothing learned covers). Hugging Face's T5 tokenizer adds its 100 `<extra_id_*>` tokens
  after the pieces (ids 32 000-32 099); the model has 32 128 embedding rows.
- `write_clip_bpe`: CLIP's byte-level BPE files (vocab.json + merges.txt, with
  tokenizer_config.json): 256 byte symbols, the same with `</w>`, merges learned on the text,
  synthetic merges up to `vocab_size` (49 408), then `<|startoftext|>` and `<|endoftext|>`
  (the largest id, as in OpenAI's vocabulary).
"""

import collections
import io
import itertools
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from avg_jax.encoders import bpe
from avg_jax.vokens import EOS_ID, PAD_ID, UNK_ID

T5_PIECES = 32_000
CLIP_VOCAB = 49_408
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# protobuf-generated classes: sentencepiece ships no type information for them.
_NORMAL = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL  # type: ignore[attr-defined]


def _synthetic_words(taken: set[str], seed: int) -> Iterable[str]:
  """Distinct letter strings (3, then 4, ... letters) not in `taken`, in a seeded order."""
  rng = np.random.default_rng(seed)
  for length in itertools.count(3):
    words = ["".join(p) for p in itertools.product(_LETTERS, repeat=length)]
    for i in rng.permutation(len(words)):
      if words[i] not in taken:
        yield words[i]


def t5_sentencepiece(texts: Sequence[str], num_pieces: int = T5_PIECES, seed: int = 0) -> bytes:
  """The serialized model described in the module docstring."""
  buffer = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(texts),
    model_writer=buffer,
    model_type="unigram",
    vocab_size=min(num_pieces, 2000),
    hard_vocab_limit=False,
    pad_id=PAD_ID,
    eos_id=EOS_ID,
    unk_id=UNK_ID,
    bos_id=-1,
    character_coverage=1.0,
    num_threads=1,
    minloglevel=2,
  )
  proto = sentencepiece_model_pb2.ModelProto.FromString(buffer.getvalue())  # type: ignore[attr-defined]
  learned = len(proto.pieces)
  if learned > num_pieces:
    raise ValueError(f"the text gives {learned} pieces, more than num_pieces={num_pieces}")
  lowest = min(p.score for p in proto.pieces if p.type == _NORMAL)
  taken = {p.piece.lstrip("\u2581") for p in proto.pieces}
  for i, word in zip(range(num_pieces - learned), _synthetic_words(taken, seed)):
    piece = proto.pieces.add()
    piece.piece, piece.score, piece.type = "\u2581" + word, lowest - 10.0 - 1e-4 * i, _NORMAL
  proto.trainer_spec.vocab_size = num_pieces
  return proto.SerializeToString()


def _learn_merges(texts: Iterable[str], budget: int) -> list[tuple[str, str]]:
  """Byte-level BPE merges, most frequent pair first (ties: the smaller pair), at most
  `budget`, none of a pair seen once."""
  table = bpe.bytes_to_unicode()
  counts = collections.Counter(w for t in texts for w in bpe.split_words(bpe.clean_text(t)))
  words = []
  for word, n in counts.items():
    symbols = [table[b] for b in word.encode("utf-8")]
    symbols[-1] += "</w>"
    words.append((symbols, n))
  merges: list[tuple[str, str]] = []
  while len(merges) < budget:
    pairs: collections.Counter[tuple[str, str]] = collections.Counter()
    for symbols, n in words:
      for pair in zip(symbols[:-1], symbols[1:]):
        pairs[pair] += n
    if not pairs:
      break
    best = min(pairs, key=lambda p: (-pairs[p], p))
    if pairs[best] < 2:
      break
    merges.append(best)
    for k, (symbols, n) in enumerate(words):
      out, i = [], 0
      while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
          out.append(symbols[i] + symbols[i + 1])
          i += 2
        else:
          out.append(symbols[i])
          i += 1
      words[k] = (out, n)
  return merges


def clip_bpe(
  texts: Sequence[str], vocab_size: int = CLIP_VOCAB
) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """`(vocab, merges)` as described in the module docstring."""
  base = list(bpe.bytes_to_unicode().values())
  tokens = base + [b + "</w>" for b in base]
  budget = vocab_size - len(tokens) - 2
  if budget < 0:
    raise ValueError(f"vocab_size {vocab_size} is below the {len(tokens) + 2} fixed tokens")
  merges = _learn_merges(texts, budget)
  vocab_set = set(tokens)
  for a, b in merges:
    vocab_set.add(a + b)
  tokens += [a + b for a, b in merges]
  # Synthetic merges of two byte symbols, after every learned one (rank order = file order).
  for a, b in itertools.product(base, tokens[: len(base) * 2]):
    if len(merges) >= budget:
      break
    if a + b not in vocab_set:
      merges.append((a, b))
      tokens.append(a + b)
      vocab_set.add(a + b)
  tokens += [bpe.START, bpe.END]
  return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_bpe(directory: str, texts: Sequence[str], vocab_size: int = CLIP_VOCAB) -> int:
  """Writes vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into
  `directory`; -> the vocabulary size."""
  vocab, merges = clip_bpe(texts, vocab_size)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  special = {
    "bos_token": bpe.START,
    "eos_token": bpe.END,
    "unk_token": bpe.END,
    "pad_token": bpe.END,
  }
  with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({**special, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}, f)
  with open(os.path.join(directory, "special_tokens_map.json"), "w", encoding="utf-8") as f:
    json.dump(special, f)
  return len(vocab)
