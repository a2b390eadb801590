"""The decoding settings every caller of the search shares (`config.decode`): one form.

`DecodeConfig` is the only form of the decode settings: `DecodeConfig.from_config(config.decode,
recall_ks)` is the one place that knows the config keys, `__post_init__` the one place that
checks the values, and `DecodeConfig.beam` the one place that sizes the beam for k results.
Stages pass the object itself to the search (`search.build_search`, `search.make_search_fn`,
`search.run_search`; a frozen dataclass is hashable, so it is the jitted program's static
argument), and where another k is needed they derive one with `with_k` (`dataclasses.replace`).
An export stores it (`to_dict`, the manifest's `decode`) and a `Retriever` reads it back
(`from_dict`): the round trip is exact, and `from_dict` rejects unknown and missing keys.

Manifests of export format 1 written before a key existed lack it; `from_dict` fills exactly
the keys of `ADDED_KEYS` with the behaviour those exports had (every other key is required):

  voken_logits_only  False           scored over the full vocabulary
  tie_break          "learned"       the generator scored the disambiguation position
  dense_levels       1               the trie's first level as a dense table
  hybrid_weight      None            plain AVG (no avg_hybrid re-ranking)
  hybrid_query       "dual_encoder"  (only read with a hybrid_weight)
  trained_length     None            the vocabulary's P: full identifiers, then EOS
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from avg_jax.decoding.beam_search import MASK_MODES
from avg_jax.errors import UserError

# How images that share their semantic codes are ordered (see avg_jax/decoding/search.py).
TIE_BREAKS = ("learned", "similarity", "image_id")
# Where avg_hybrid's query embedding comes from: the dual encoder's text tower, or a linear
# head on the generator's encoder (models/query_head.py: no second transformer pass).
HYBRID_QUERIES = ("dual_encoder", "generator")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Beam search settings.

  `beam_size`: beams per query; `top_k`: results per query (the search runs with
  `beam = max(beam_size, top_k)` beams so that k results exist); `tie_break`: "learned" (the
  generator scores the disambiguation position, so it must be trained on it), "similarity"
  (images that share semantic codes are ordered by the dual encoder's query-image cosine
  similarity) or "image_id" (by image id). `hybrid_weight`: None for plain AVG; a number
  re-ranks the beam's images by log-prob + weight x the dual encoder's query-image cosine
  similarity (`avg_hybrid`, see `search.hybrid_rescore`); `hybrid_query`: that query embedding
  from the dual encoder's text tower ("dual_encoder") or predicted from the generator's
  encoder ("generator", `models.query_head`). `trained_length`: identifier positions the
  generator emits before EOS, L (semantic codes) or P (full identifiers); None: the
  vocabulary's P. It is the generator's property (`Generator.trained_length`), carried here so
  that the search and the export manifest read it from the one object: `from_config` leaves it
  None and the stages set it with `for_generator`.
  """

  beam_size: int = 10
  top_k: int = 10
  mask_mode: str = "after_softmax"
  tie_break: str = "learned"
  voken_logits_only: bool = False
  dense_levels: int = 1
  batch_size: int = 32
  hybrid_weight: float | None = None
  hybrid_query: str = "dual_encoder"
  trained_length: int | None = None

  def __post_init__(self):
    if self.beam_size < 1:
      raise UserError(f"config decode.beam_size must be >= 1, got {self.beam_size}")
    if self.top_k < 1:
      raise UserError(f"config decode.top_k must be >= 1, got {self.top_k}")
    if self.mask_mode not in MASK_MODES:
      raise UserError(
        f"config decode.mask_mode must be one of {', '.join(MASK_MODES)}, got {self.mask_mode!r}"
      )
    if self.tie_break not in TIE_BREAKS:
      raise UserError(
        f"config decode.tie_break must be one of {', '.join(TIE_BREAKS)}, got {self.tie_break!r}"
      )
    if self.hybrid_query not in HYBRID_QUERIES:
      raise UserError(
        f"config decode.hybrid_query must be one of {', '.join(HYBRID_QUERIES)}, "
        f"got {self.hybrid_query!r}"
      )
    if self.dense_levels < 0:
      raise UserError(f"config decode.dense_levels must be >= 0, got {self.dense_levels}")
    if self.batch_size < 1:
      raise UserError(f"config decode.batch_size must be >= 1, got {self.batch_size}")
    if self.trained_length is not None and self.trained_length < 1:
      raise UserError(f"decode trained_length must be >= 1, got {self.trained_length}")

  @classmethod
  def from_config(cls, decode, recall_ks: Sequence[int] = ()) -> "DecodeConfig":
    """From `config.decode`; `top_k` is raised to the largest of `recall_ks` (evaluation)."""
    top_k = max([int(decode.top_k)] + [int(k) for k in recall_ks])
    return cls(
      beam_size=int(decode.beam_size),
      top_k=top_k,
      mask_mode=str(decode.mask_mode),
      tie_break=str(decode.tie_break),
      voken_logits_only=bool(decode.voken_logits_only),
      dense_levels=int(decode.dense_levels),
      batch_size=int(decode.batch_size),
      hybrid_weight=(None if decode.hybrid_weight is None else float(decode.hybrid_weight)),
      hybrid_query=str(decode.hybrid_query),
    )

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "DecodeConfig":
    """From an export's `decode` settings (`to_dict`). A key that is not a field, or a
    missing key other than those of `ADDED_KEYS` (module docstring), is a one-line UserError
    naming it."""
    if not isinstance(d, Mapping):
      raise UserError(f"decode settings must be an object, got {type(d).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in names]
    if unknown:
      raise UserError(f"decode settings: unknown key {unknown[0]!r}")
    missing = [k for k in names if k not in d and k not in ADDED_KEYS]
    if missing:
      raise UserError(f"decode settings: missing key {missing[0]!r}")
    return cls(**{**ADDED_KEYS, **d})

  def to_dict(self) -> dict:
    """Every field (`from_dict(d.to_dict()) == d`)."""
    return dataclasses.asdict(self)

  def with_k(self, k: int) -> "DecodeConfig":
    """The same settings with `top_k=k` (the beam widens to k if needed)."""
    return dataclasses.replace(self, top_k=int(k))

  def for_generator(self, trained_length: int) -> "DecodeConfig":
    """The same settings for a generator that emits `trained_length` positions before EOS."""
    return dataclasses.replace(self, trained_length=int(trained_length))

  @property
  def program(self) -> "DecodeConfig":
    """The settings the compiled search depends on, the others at their defaults: the jitted
    program's static argument, so that settings differing only in what the program never
    reads share one compile. `batch_size` is how callers split queries (the program sees a
    shape), `hybrid_query` where they take the query embedding from (the program sees an
    array or a head), `dense_levels` how the trie was laid out (its arrays' shapes), and the
    tie-breaks other than "similarity" order a leaf's images alike (by id)."""
    return dataclasses.replace(
      self,
      batch_size=DecodeConfig.batch_size,
      hybrid_query=DecodeConfig.hybrid_query,
      dense_levels=DecodeConfig.dense_levels,
      tie_break="similarity" if self.order_by_similarity else "image_id",
    )

  @property
  def order_by_similarity(self) -> bool:
    """Images that share a leaf are ordered by query-image similarity (else by image id)."""
    return self.tie_break == "similarity"

  @property
  def beam(self) -> int:
    """Beams the search runs with: at least one per result."""
    return max(self.beam_size, self.top_k)

  @property
  def learned_suffix(self) -> bool:
    """The generator is trained on (and scores) the disambiguation position."""
    return self.tie_break == "learned"

  @property
  def needs_embeddings(self) -> bool:
    """The search reads query and image embeddings (similarity tie-break or avg_hybrid)."""
    return self.tie_break == "similarity" or self.hybrid_weight is not None

  @property
  def uses_query_head(self) -> bool:
    """avg_hybrid with the generator's own query embedding (`models.query_head`); it then
    serves the similarity tie-break too."""
    return self.hybrid_weight is not None and self.hybrid_query == "generator"

  @property
  def needs_text_tower(self) -> bool:
    """The query embeddings come from the dual encoder's text tower."""
    return self.needs_embeddings and not self.uses_query_head


# Keys added to the manifest's `decode` after export format 1 first shipped, with the value
# that reproduces what an export written without them did (module docstring).
ADDED_KEYS: dict[str, Any] = {
  "voken_logits_only": False,
  "tie_break": "learned",
  "dense_levels": 1,
  "hybrid_weight": None,
  "hybrid_query": "dual_encoder",
  "trained_length": None,
}
