"""Loading ml_collections configs from `configs/*.py` and applying command-line overrides.

`--config configs/smoke.py:tiny` imports the file and calls `get_config("tiny")` (a relative
path missing from the current directory is read from this checkout's `configs/`); overrides such
as `--config.t5.d_model=256` replace existing fields only: an unknown key is a `UserError`
naming it. The value is parsed with the type of the field it replaces. Every count, size,
rate and fraction is then checked against `RULES` (`validate`) before any stage runs.
"""

import ast
import dataclasses
import importlib.util
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections

from avg_jax.errors import UserError

# The checkout this package runs from (an editable install): `configs/...` paths that do not
# exist in the current directory are looked up here, so `avg-jax` works from any directory.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def resolve_config_path(path: str) -> str:
  """`path` when it exists; else, for a relative path, the same path under `REPO_ROOT` when
  that exists (e.g. `configs/smoke.py` from another directory); else `path`."""
  if os.path.isfile(path) or os.path.isabs(path):
    return path
  in_repo = os.path.join(REPO_ROOT, path)
  return in_repo if os.path.isfile(in_repo) else path


def _import_config_module(path: str):
  path = resolve_config_path(path)
  if not os.path.isfile(path):
    raise UserError(f"config file not found: {path}")
  # Config files may import their siblings as `configs.base`: put the folder above on the path.
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)
  name = "_avg_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise UserError(f"config file {path}: not a Python file")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(f"config file {path}: syntax error on line {e.lineno}: {e.msg}") from e
  if not hasattr(module, "get_config"):
    raise UserError(f"config file {path} defines no get_config(arg)")
  return module


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `path[:arg]`, applies `overrides` (`key.path=value` strings) and locks the result."""
  path, _, arg = spec.partition(":")
  module = _import_config_module(path)
  try:
    config = module.get_config(arg) if arg else module.get_config(None)
  except (ValueError, KeyError) as e:
    raise UserError(f"config file {path}: bad argument {arg!r}: {e}") from e
  config = ml_collections.ConfigDict(config)
  apply_overrides(config, overrides)
  validate(config)
  config.lock()
  return config


def parse_value(key: str, text: str, current: Any) -> Any:
  """Parses `text` into the type of `current` (the value being replaced)."""
  try:
    if isinstance(current, bool):
      lowered = text.strip().lower()
      if lowered in _TRUE:
        return True
      if lowered in _FALSE:
        return False
      raise ValueError("expected true or false")
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str):
      return text
    if isinstance(current, (tuple, list)):
      value = ast.literal_eval(text)
      if not isinstance(value, (tuple, list)):
        value = (value,)
      return type(current)(value)
    if current is None:
      try:
        return ast.literal_eval(text)
      except (ValueError, SyntaxError):
        return text
    return ast.literal_eval(text)
  except (ValueError, SyntaxError) as e:
    kind = type(current).__name__
    raise UserError(f"config key {key}: cannot parse {text!r} as {kind}") from e


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Applies `a.b.c=value` overrides in place; unknown keys raise `UserError`."""
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise UserError(f"config override {item!r}: expected key=value")
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise UserError(f"unknown config key: {'.'.join(parts[: i + 1])}")
      if i < len(parts) - 1:
        node = node[part]
    current = node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
      raise UserError(f"config key {key} is a section; override one of its fields")
    with node.unlocked():
      node[parts[-1]] = parse_value(key, text, current)


def get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  """Reads `a.b.c` from `config`, raising `UserError` naming a missing key."""
  node = config
  for i, part in enumerate(dotted.split(".")):
    if part not in node:
      raise UserError(f"config is missing key: {'.'.join(dotted.split('.')[: i + 1])}")
    node = node[part]
  return node


def to_json_dict(config: ml_collections.ConfigDict) -> dict:
  """A plain-dict copy of the config (tuples become lists) for metadata files."""
  return ml_collections.ConfigDict(config).to_dict()


# --- Value rules ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
  """A number in a range: `low` / `high` bounds (None: unbounded), each inclusive unless
  `open_low` / `open_high`; `integer` for counts; `each` for a tuple of such numbers (which
  must then be non-empty)."""

  low: float | None = None
  high: float | None = None
  open_low: bool = False
  open_high: bool = False
  integer: bool = False
  each: bool = False
  may_be_empty: bool = False  # with `each`: () switches the feature off

  def describe(self) -> str:
    kind = "integers" if self.integer else "numbers"
    if self.low is not None and self.high is not None:
      lo, hi = "(" if self.open_low else "[", ")" if self.open_high else "]"
      text = f"{kind} in {lo}{self.low:g}, {self.high:g}{hi}"
    elif self.low is not None:
      text = f"{kind} {'>' if self.open_low else '>='} {self.low:g}"
    else:
      text = kind
    if self.each:
      return f"{'a' if self.may_be_empty else 'a non-empty'} list of {text}"
    return ("an integer" if self.integer else "a number") + text[len(kind) :]

  def accepts_one(self, value: Any) -> bool:
    # bool is an int subclass: `true` is not a count.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return False
    if self.integer and not isinstance(value, int):
      return False
    if isinstance(value, float) and not math.isfinite(value):
      return False
    if self.low is not None and (value <= self.low if self.open_low else value < self.low):
      return False
    if self.high is not None and (value >= self.high if self.open_high else value > self.high):
      return False
    return True

  def accepts(self, value: Any) -> bool:
    if not self.each:
      return self.accepts_one(value)
    return (
      isinstance(value, (tuple, list))
      and (len(value) > 0 or self.may_be_empty)
      and all(self.accepts_one(v) for v in value)
    )


COUNT = Rule(low=1, integer=True)  # how many of something: at least one
COUNT_OR_0 = Rule(low=0, integer=True)  # 0 is meaningful (none, never, "all", only at end)
POSITIVE = Rule(low=0, open_low=True)  # rates, temperatures, epsilons
NON_NEGATIVE = Rule(low=0)  # weights, decays, clip norms (0: off)
FRACTION = Rule(low=0, high=1)
PROBABILITY = Rule(low=0, high=1, open_high=True)  # dropout: 1 would drop everything
COUNTS = Rule(low=1, integer=True, each=True)
COUNTS_OR_NONE = Rule(low=1, integer=True, each=True, may_be_empty=True)

# Every count, size, rate and fraction a stage reads -> the values that make sense. Checked
# before any work: a bad value used to run anyway (train.steps=-5 "finished" at once and
# shipped random parameters). Keys absent from a config are skipped.
RULES: dict[str, Rule] = {
  "data.num_train": COUNT,
  "data.num_val": COUNT,
  "data.num_test": COUNT,
  "data.image_size": COUNT,
  "data.captions_per_image": COUNT,
  "data.pseudo_queries_per_image": COUNT_OR_0,
  "data.jpeg_quality": Rule(1, 100, integer=True),
  "data.examples_per_shard": COUNT,
  "loader.worker_count": COUNT_OR_0,
  "loader.worker_buffer_size": COUNT,
  "loader.read_threads": COUNT,
  "loader.prefetch_buffer_size": COUNT_OR_0,
  "text_tokenizer.vocab_size": COUNT,
  "text_tokenizer.max_length": Rule(2, integer=True),
  "encoder.image_size": COUNT,
  "encoder.patch_size": COUNT,
  "encoder.vision_width": COUNT,
  "encoder.vision_layers": COUNT,
  "encoder.vision_heads": COUNT,
  "encoder.vision_mlp_dim": COUNT,
  "encoder.text_width": COUNT,
  "encoder.text_layers": COUNT,
  "encoder.text_heads": COUNT,
  "encoder.text_mlp_dim": COUNT,
  "encoder.projection_dim": COUNT,
  "encoder.max_text_length": Rule(2, integer=True),
  # steps=0 is fine with a pretrained encoder; the embed stage rejects it when it must train.
  "encoder_train.steps": COUNT_OR_0,
  "encoder_train.batch_size": COUNT,
  "encoder_train.learning_rate": POSITIVE,
  "encoder_train.warmup_steps": COUNT_OR_0,
  "encoder_train.weight_decay": NON_NEGATIVE,
  "encoder_train.init_temperature": POSITIVE,
  "encoder_train.embed_batch_size": COUNT,
  "encoder_train.embed_images_per_shard": COUNT,
  "encoder_train.log_every": COUNT_OR_0,
  "encoder_train.checkpoint_every": COUNT_OR_0,
  "encoder_train.query_batch_size": COUNT,
  "encoder_train.retrieval_chunk_size": COUNT,
  "tokenizer.num_levels": COUNT,
  "tokenizer.codebook_size": COUNT,
  "tokenizer.e_dim": COUNT,
  "tokenizer.hidden_dims": COUNTS,
  "tokenizer.dropout": PROBABILITY,
  "tokenizer.beta": NON_NEGATIVE,
  "tokenizer.quant_weight": NON_NEGATIVE,
  "tokenizer.recon_weight": NON_NEGATIVE,
  "tokenizer.align_weight": NON_NEGATIVE,
  "tokenizer.infonce_temperature": POSITIVE,
  "tokenizer.learning_rate": POSITIVE,
  "tokenizer.weight_decay": NON_NEGATIVE,
  "tokenizer.batch_size": COUNT,
  "tokenizer.steps": COUNT,
  "tokenizer.kmeans_iters": COUNT_OR_0,
  "tokenizer.kmeans_init_batches": COUNT,
  "tokenizer.dead_code_after": COUNT,
  "tokenizer.checkpoint_every": COUNT_OR_0,
  "tokenizer.keep_checkpoints": COUNT,
  "tokenizer.log_every": COUNT_OR_0,
  "tokenizer.assign_batch_size": COUNT,
  "tokenizer.analysis_pairs": COUNT_OR_0,
  "t5.vocab_size": COUNT,
  "t5.d_model": COUNT,
  "t5.d_kv": COUNT,
  "t5.d_ff": COUNT,
  "t5.num_heads": COUNT,
  "t5.num_encoder_layers": COUNT,
  "t5.num_decoder_layers": COUNT,
  "t5.relative_attention_num_buckets": Rule(4, integer=True),
  "t5.relative_attention_max_distance": COUNT,
  "t5.dropout_rate": PROBABILITY,
  "t5.layer_norm_epsilon": POSITIVE,
  "train.steps": COUNT,
  "train.batch_size": COUNT,
  "train.learning_rate": POSITIVE,
  "train.warmup_fraction": FRACTION,
  "train.end_learning_rate_fraction": FRACTION,
  "train.weight_decay": NON_NEGATIVE,
  "train.grad_clip_norm": NON_NEGATIVE,
  "train.grad_accum_steps": COUNT,
  "train.temperature": POSITIVE,
  "train.pseudo_query_repeats": COUNT_OR_0,
  "train.checkpoint_every": COUNT_OR_0,
  "train.keep_checkpoints": COUNT,
  "train.eval_every": COUNT_OR_0,
  "train.eval_max_queries": COUNT_OR_0,
  "train.log_every": COUNT_OR_0,
  "rank.steps": COUNT,
  "rank.batch_size": COUNT,
  "rank.learning_rate": POSITIVE,
  "rank.warmup_fraction": FRACTION,
  "rank.rank_weight": NON_NEGATIVE,
  "rank.beam_size": COUNT,
  "rank.score_temperature": POSITIVE,
  "rank.checkpoint_every": COUNT_OR_0,
  "rank.eval_every": COUNT_OR_0,
  "decode.beam_size": COUNT,
  "decode.top_k": COUNT,
  "decode.batch_size": COUNT,
  "decode.dense_levels": COUNT_OR_0,
  "decode.query_head_l2": NON_NEGATIVE,
  "evaluate.recall_ks": COUNTS,
  "evaluate.efficiency_sizes": COUNTS_OR_NONE,
  "evaluate.efficiency_queries": COUNT,
  "evaluate.hybrid_weights": Rule(low=0, each=True),
  "evaluate.ann_ef_search": COUNTS_OR_NONE,
  "evaluate.ann_m": COUNT,
  "evaluate.ann_ef_construction": COUNT,
  "evaluate.ann_target_recall": FRACTION,
  "evaluate.ann_max_items": COUNT_OR_0,
  "export.batch_buckets": COUNTS,
  "export.max_query_chars": COUNT,
  "export.thumbnail_size": COUNT_OR_0,
  "aot.index_size": COUNT_OR_0,
  "aot.disambiguation_size": COUNT,
  "aot.roofline_efficiency": Rule(0, 1, open_low=True),
  "distributed.num_processes": COUNT,
  "distributed.process_id": COUNT_OR_0,
}


def _lookup(config: ml_collections.ConfigDict, dotted: str) -> tuple[bool, Any]:
  node = config
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False, None
    node = node[part]
  return True, node


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every key of `RULES` present in `config` (and the pairs that must agree); the
  first bad one is a one-line `UserError` naming the key, its value and what it must be."""
  for key, rule in RULES.items():
    present, value = _lookup(config, key)
    if present and not rule.accepts(value):
      raise UserError(f"config key {key}: must be {rule.describe()}, got {value!r}")
  present, weight = _lookup(config, "decode.hybrid_weight")
  if present and weight is not None and not NON_NEGATIVE.accepts(weight):
    raise UserError(
      f"config key decode.hybrid_weight: must be None or {NON_NEGATIVE.describe()}, got {weight!r}"
    )
  # Pairs: attention heads split the width; a process id names one of the processes.
  for width, heads in (
    ("encoder.vision_width", "encoder.vision_heads"),
    ("encoder.text_width", "encoder.text_heads"),
  ):
    (has_w, w), (has_h, h) = _lookup(config, width), _lookup(config, heads)
    if has_w and has_h and w % h:
      raise UserError(f"config key {width}: {w} is not divisible by {heads}={h}")
  (has_n, n), (has_p, p) = (
    _lookup(config, "distributed.num_processes"),
    _lookup(config, "distributed.process_id"),
  )
  if has_n and has_p and p >= n:
    raise UserError(
      f"config key distributed.process_id: must be < distributed.num_processes={n}, got {p}"
    )
