"""The token-to-voken generator as the train, rank, evaluate and export stages see it.

Builds the T5 config whose vocabulary is the model's text rows plus the voken rows of a
scheme's voken table, creates (or imports) its parameters already sharded on a mesh with the
voken rows initialised from the tokenizer's codebook, and loads the text tokenizer.

A generator belongs to a (scheme, protocol): its voken table is `tokenize`'s fit for that
protocol (`tokenizer.fit.tokenizer_name`), its training examples follow the protocol. What
it is trained to emit depends on `decode.tie_break`: the full identifier (semantic codes and
disambiguation position, "learned") or the semantic codes alone; then EOS.
"""

import dataclasses
import hashlib
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from avg_jax.artifacts import stage_inputs, voken_tables
from avg_jax.data import dataset
from avg_jax.data import pseudo_queries as pseudo_lib
from avg_jax.data.text_tokenizer import TextTokenizer
from avg_jax.decoding.config import DecodeConfig
from avg_jax.decoding.trie import VokenTrie
from avg_jax.errors import UserError
from avg_jax.models import t5_init
from avg_jax.models.t5_config import T5Config, hf_architecture, read_hf_config
from avg_jax.tokenizer.fit import tokenizer_name
from avg_jax.vokens import VokenVocabulary


@dataclasses.dataclass
class Generator:
  """Everything needed to run the generator of one identifier scheme."""

  cfg: T5Config
  vocab: VokenVocabulary
  table: dict  # split -> (image_ids int64[N], codes int32[N, P])
  codebook: np.ndarray
  tokenizer: TextTokenizer
  table_hash: str  # identifies the voken table and the targets the model is trained on
  scheme: str = "avg"
  protocol: str = "transductive"
  decode: DecodeConfig = DecodeConfig()

  @property
  def trained_length(self) -> int:
    """Identifier positions the generator emits before EOS: P ("learned") or L."""
    return self.vocab.id_length if self.decode.learned_suffix else self.vocab.num_levels

  def codes(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """`(image_ids int64[N], codes int32[N, trained_length])` of a split's images."""
    image_ids, codes = self.table[split]
    return image_ids, codes[:, : self.trained_length]

  def targets(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """`(image_ids int64[N], target tokens int32[N, trained_length + 1])` (vokens + EOS)."""
    image_ids, codes = self.codes(split)
    return image_ids, self.vocab.target_tokens(codes)

  def trie(self, splits) -> VokenTrie:
    """The prefix tree over the images of `splits` (one index: an evaluated split, or the
    union of a training run's target images), over the positions the generator emits."""
    ids, codes = zip(*(self.codes(s) for s in splits))
    return VokenTrie.build(
      np.concatenate(codes),
      np.concatenate(ids),
      position_sizes=self.vocab.position_sizes()[: self.trained_length],
    )

  def training_splits(self) -> tuple[str, ...]:
    """Splits whose identifiers are training targets: train, plus the indexed splits under
    the transductive protocol (through their pseudo queries)."""
    if self.protocol == "inductive":
      return ("train",)
    return ("train",) + tuple(s for s in self.table if s != "train")


def model_text_rows(t5_config: ConfigDict) -> int:
  """Text rows of the model's embedding: the Hugging Face checkpoint's or `t5.vocab_size`."""
  if t5_config.pretrained_path:
    return int(
      hf_architecture(read_hf_config(t5_config.pretrained_path), t5_config.pretrained_path)[
        "vocab_size"
      ]
    )
  return int(t5_config.vocab_size)


def table_hash(table: dict, *extra: str) -> str:
  h = hashlib.sha256()
  for value in extra:
    h.update(value.encode())
  for split in sorted(table):
    ids, codes = table[split]
    h.update(split.encode())
    h.update(np.ascontiguousarray(ids, np.int64).tobytes())
    h.update(np.ascontiguousarray(codes, np.int32).tobytes())
  return h.hexdigest()[:16]


def made_from_inputs(config: ConfigDict, workdir: str | None, scheme: str, protocol: str):
  """`stage -> inputs` of the stages behind the generator of (`scheme`, `protocol`) under
  `config` in `workdir` (evaluate's generators differ from the config in these two keys
  only)."""
  overrides = {"tokenizer.scheme": scheme, "protocol": protocol}
  return lambda stage: stage_inputs.inputs(stage, config, overrides, workdir)


def load_generator(
  config: ConfigDict, workdir: str, scheme: str, protocol: str | None = None
) -> Generator:
  """Reads the voken table of `scheme` for `protocol` (default `config.protocol`) and the
  text tokenizer; builds the T5 config."""
  protocol = pseudo_lib.check_protocol(str(config.protocol if protocol is None else protocol))
  decode = DecodeConfig.from_config(config.decode)
  # Every output it reads was made from this config (else a one-line error naming the
  # changed keys): a generator never trains on, or is evaluated with, another's data.
  stage_inputs.require(config, workdir, "prepare", "embed")
  table_vocab, table, codebook = voken_tables.load(
    workdir,
    tokenizer_name(config, scheme, protocol),
    made_from=made_from_inputs(config, workdir, scheme, protocol)("tokenize"),
  )
  tokenizer = TextTokenizer.load(dataset.text_tokenizer_file(workdir))
  text_rows = model_text_rows(config.t5)
  if tokenizer.vocab_size > text_rows:
    raise UserError(
      f"text tokenizer has {tokenizer.vocab_size} pieces but the model has only "
      f"{text_rows} text rows (config t5.vocab_size)"
    )
  # Voken token ids start after the model's text rows (T5 pads its 32000 pieces to 32128).
  vocab = dataclasses.replace(table_vocab, text_vocab_size=text_rows)
  cfg = T5Config.from_config(config.t5, vocab)
  # The targets depend on the table and on whether the disambiguation position is one.
  targets = "full" if decode.learned_suffix else "semantic"
  return Generator(
    cfg=cfg,
    vocab=vocab,
    table=table,
    codebook=codebook,
    tokenizer=tokenizer,
    table_hash=table_hash(table, targets),
    scheme=scheme,
    protocol=protocol,
    decode=decode,
  )


def init_params(config: ConfigDict, gen: Generator, mesh, rng: jax.Array) -> tuple[Any, Any]:
  """`(params, shardings)`: sharded parameters with voken rows set from the codebook.

  From the Hugging Face checkpoint in `t5.pretrained_path` when given, else random.
  """
  _, params, shardings = t5_init.initial_params(
    config.t5, gen.vocab, gen.codebook, mesh, rng, seed=int(config.seed)
  )
  return params, shardings
