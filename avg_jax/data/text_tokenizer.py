"""The text tokenizer: SentencePiece with T5's id conventions (pad 0, eos 1, unk 2, no bos).

Either trained on the training captions (the embedded default) or loaded from a given
`.model` (e.g. T5's spiece.model). Text ids are `[0, vocab_size)`; voken tokens are appended
after them by `avg_jax.vokens` (the only place that knows that layout).
"""

import io
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from avg_jax.artifacts import io as artifacts_io
from avg_jax.errors import UserError
from avg_jax.vokens import EOS_ID, PAD_ID, UNK_ID

# Upper bound on sentences SentencePiece samples for training (MS-COCO has ~600K captions).
MAX_TRAINING_SENTENCES = 2_000_000


class TextTokenizer:
  """A SentencePiece model with T5 special ids; picklable (for grain worker processes)."""

  def __init__(self, model_proto: bytes, source: str = "<memory>"):
    self._proto = bytes(model_proto)
    self.source = source
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(self._proto)
    except (RuntimeError, OSError) as e:
      raise UserError(f"{source}: not a SentencePiece model ({e})") from e
    ids = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id(), self._sp.bos_id())
    if ids[:3] != (PAD_ID, EOS_ID, UNK_ID) or ids[3] >= 0:
      raise UserError(
        f"{source}: SentencePiece ids pad/eos/unk/bos are {ids}, expected "
        f"({PAD_ID}, {EOS_ID}, {UNK_ID}, none) as T5's"
      )

  @classmethod
  def load(cls, path: str) -> "TextTokenizer":
    """Reads a SentencePiece `.model` file."""
    try:
      with open(path, "rb") as f:
        proto = f.read()
    except OSError as e:
      raise UserError(f"text tokenizer model not readable: {path} ({e.strerror})") from e
    return cls(proto, source=path)

  @classmethod
  def train(
    cls, texts: Iterable[str], vocab_size: int, path: str, *, model_type: str = "unigram"
  ) -> "TextTokenizer":
    """Trains a SentencePiece model with exactly `vocab_size` pieces and writes it to `path`
    (atomically); raises `UserError` when the texts cannot support that many pieces."""
    if model_type not in ("unigram", "bpe"):
      raise UserError(f"config text_tokenizer.model_type: {model_type!r} is not unigram or bpe")
    buffer = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buffer,
        vocab_size=int(vocab_size),
        model_type=model_type,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        character_coverage=1.0,
        input_sentence_size=MAX_TRAINING_SENTENCES,
        shuffle_input_sentence=True,
        num_threads=os.cpu_count() or 1,
        hard_vocab_limit=True,
        minloglevel=2,
      )
    except RuntimeError as e:
      # e.g. "Vocabulary size too high (400). Please set it to a value <= 311."
      limit = re.search(r"<= (\d+)", str(e))
      hint = f" (at most {limit.group(1)} for these captions)" if limit else ""
      raise UserError(
        f"config text_tokenizer.vocab_size={vocab_size}: SentencePiece training "
        f"failed: {str(e).strip()}{hint}"
      ) from e
    tokenizer = cls(buffer.getvalue(), source=path)
    artifacts_io.write_bytes(path, tokenizer._proto)
    return tokenizer

  @property
  def vocab_size(self) -> int:
    """Number of text pieces; text ids are in `[0, vocab_size)`."""
    return self._sp.GetPieceSize()

  @property
  def model_proto(self) -> bytes:
    return self._proto

  def encode(self, text: str) -> list[int]:
    """Piece ids of `text` (no EOS)."""
    return self._sp.EncodeAsIds(text)

  def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
    """Piece ids of each text (no EOS, no padding)."""
    return self._sp.EncodeAsIds(list(texts))

  def encode_batch(self, texts: Sequence[str], max_length: int) -> np.ndarray:
    """`int32 [B, max_length]`: ids, truncated to `max_length - 1`, then EOS, then zeros.

    EOS is kept after truncation (as T5 preprocessing does) so the encoder always sees the
    end of the query.
    """
    if max_length < 1:
      raise ValueError(f"max_length must be >= 1, got {max_length}")
    out = np.zeros((len(texts), max_length), np.int32)
    for i, ids in enumerate(self._sp.EncodeAsIds(list(texts))):
      ids = ids[: max_length - 1] + [EOS_ID]
      out[i, : len(ids)] = ids
    return out

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` up to the first EOS; pads and non-text ids (vokens) are dropped."""
    text_ids = []
    for i in np.asarray(ids, np.int64).reshape(-1).tolist():
      if i == EOS_ID:
        break
      if i != PAD_ID and 0 <= i < self.vocab_size:
        text_ids.append(i)
    return self._sp.DecodeIds(text_ids)

  def __getstate__(self):
    return {"proto": self._proto, "source": self.source}

  def __setstate__(self, state):
    self.__init__(state["proto"], state["source"])
