"""The one place that maps image identifiers (vokens) to seq2seq token ids and back.

An image's identifier is `codes[P]`: `num_levels` residual-quantisation codes in `[0, K)`,
optionally followed by one disambiguation index in `[0, D)` that makes identifiers unique.
Token ids are laid out after the text vocabulary (T5 convention: pad 0, eos 1, unk 2):

    [0, text_vocab)                          text tokens
    [text_vocab, text_vocab + V)             level tokens: V = K (one codebook shared by all
                                             levels, the reference) or L * K (per level)
    [text_vocab + V, text_vocab + V + D)     disambiguation tokens (D = 0 when unused)
"""

import dataclasses

import numpy as np

from avg_jax.errors import UserError

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2


@dataclasses.dataclass(frozen=True)
class VokenVocabulary:
  """Token-id layout of the voken rows appended to a text vocabulary."""

  text_vocab_size: int
  codebook_size: int  # K
  num_levels: int  # L
  shared_codebook: bool = True
  disambiguation_size: int = 0  # D; 0 means identifiers have exactly L positions

  @property
  def num_level_tokens(self) -> int:
    return self.codebook_size * (1 if self.shared_codebook else self.num_levels)

  @property
  def num_voken_tokens(self) -> int:
    """Rows appended to the embedding / output matrices."""
    return self.num_level_tokens + self.disambiguation_size

  @property
  def total_vocab_size(self) -> int:
    return self.text_vocab_size + self.num_voken_tokens

  @property
  def first_voken_id(self) -> int:
    return self.text_vocab_size

  @property
  def id_length(self) -> int:
    """P: positions in an identifier (L, or L + 1 with disambiguation)."""
    return self.num_levels + (1 if self.disambiguation_size else 0)

  def position_sizes(self) -> tuple[int, ...]:
    """Number of possible codes at each identifier position."""
    sizes = (self.codebook_size,) * self.num_levels
    return sizes + ((self.disambiguation_size,) if self.disambiguation_size else ())

  def position_offsets(self) -> np.ndarray:
    """`[P]` token id of code 0 at each identifier position."""
    offsets = []
    for level in range(self.num_levels):
      level_base = 0 if self.shared_codebook else level * self.codebook_size
      offsets.append(self.text_vocab_size + level_base)
    if self.disambiguation_size:
      offsets.append(self.text_vocab_size + self.num_level_tokens)
    return np.asarray(offsets, np.int64)

  def validate_codes(self, codes: np.ndarray, what: str = "voken codes") -> np.ndarray:
    """Checks `codes [N, P]` against the layout; returns it as int32."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != self.id_length:
      raise UserError(f"{what}: expected shape [N, {self.id_length}], got {list(codes.shape)}")
    if not np.issubdtype(codes.dtype, np.integer):
      raise UserError(f"{what}: expected integers, got {codes.dtype}")
    sizes = np.asarray(self.position_sizes())
    bad = (codes < 0) | (codes >= sizes[None, :])
    if bad.any():
      row, col = np.argwhere(bad)[0]
      raise UserError(
        f"{what}: code {int(codes[row, col])} at row {row}, position {col} is "
        f"outside [0, {int(sizes[col])})"
      )
    return codes.astype(np.int32)

  def codes_to_tokens(self, codes: np.ndarray) -> np.ndarray:
    """`[..., P]` codes -> `[..., P]` token ids."""
    codes = np.asarray(codes)
    return (codes + self.position_offsets()[: codes.shape[-1]]).astype(np.int32)

  def tokens_to_codes(self, tokens: np.ndarray) -> np.ndarray:
    """`[..., P]` token ids -> `[..., P]` codes (inverse of `codes_to_tokens`)."""
    tokens = np.asarray(tokens)
    return (tokens - self.position_offsets()[: tokens.shape[-1]]).astype(np.int32)

  def target_tokens(self, codes: np.ndarray) -> np.ndarray:
    """Decoder targets `[N, P + 1]`: the identifier's tokens followed by EOS."""
    tokens = self.codes_to_tokens(codes)
    eos = np.full(tokens.shape[:-1] + (1,), EOS_ID, np.int32)
    return np.concatenate([tokens, eos], axis=-1)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "VokenVocabulary":
    return cls(**d)
