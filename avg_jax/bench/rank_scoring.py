"""How rank scores its candidates: one encoder pass per query vs one per (query, candidate).

The rank loss teacher-forces each query's positive and `rank.beam_size` candidates. Two forms
of that scoring, with the same parameters, inputs and targets:
  per_pair  the query repeated once per candidate through the whole model
            (`t5.logits` on `[batch * n, ...]`; what rank did before it packed candidates);
  packed    one encoder pass per query, the n targets as segments of one decoder sequence
            (`t5.candidate_logits`; what `training/ltr.py` does).
For each: XLA's FLOPs of one forward + backward step, its temporary memory, and the median step
time over rounds that alternate the two forms (tests/models/test_t5_decode.py checks that
the two give the same logits).
"""

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from avg_jax import config as config_lib
from avg_jax.bench.train import step_flops
from avg_jax.models import t5 as t5_lib
from avg_jax.models.t5_config import T5Config
from avg_jax.vokens import VokenVocabulary

FORMS = ("per_pair", "packed")


def score_fn(form: str, cfg: T5Config, deterministic: bool):
  """`(params, inputs [B, S], targets [B, n, T], rng) -> scores [B, n]` in the given form."""
  rngs = (lambda rng: None) if deterministic else (lambda rng: {"dropout": rng})

  def per_pair(params, inputs, targets, rng):
    b, n, t = targets.shape
    out = t5_lib.logits(
      params,
      cfg,
      jnp.repeat(inputs, n, axis=0),
      targets.reshape(b * n, t),
      deterministic=deterministic,
      rngs=rngs(rng),
    )
    return t5_lib.sequence_log_probs(out.reshape(b, n, t, -1), targets)

  def packed(params, inputs, targets, rng):
    out = t5_lib.candidate_logits(
      params, cfg, inputs, targets, deterministic=deterministic, rngs=rngs(rng)
    )
    return t5_lib.sequence_log_probs(out, targets)

  return {"per_pair": per_pair, "packed": packed}[form]


def step_fn(form: str, cfg: T5Config, deterministic: bool = False):
  """Jitted `(params, inputs, targets, rng) -> ((loss, scores [B, n]), grads)`: a listwise
  loss over the scores (candidate 0 the positive) plus the positive's log-likelihood, as the
  rank step differentiates them."""
  scores = score_fn(form, cfg, deterministic)

  def loss(params, inputs, targets, rng):
    s = scores(params, inputs, targets, rng)
    return -jnp.mean(jax.nn.log_softmax(s, axis=-1)[:, 0] + s[:, 0]), s

  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def problem(spec: str, batch: int, seed: int = 0):
  """`(cfg, params, inputs int[batch, S], targets int[batch, n, P + 1])` for the config `spec`:
  random parameters, random query ids, n = 1 + rank.beam_size random identifiers + EOS."""
  config = config_lib.load_config(spec)
  vocab = VokenVocabulary(
    int(config.t5.vocab_size),
    int(config.tokenizer.codebook_size),
    int(config.tokenizer.num_levels),
    bool(config.tokenizer.shared_codebook),
    disambiguation_size=8,
  )
  cfg = T5Config.from_config(config.t5, vocab)
  params = t5_lib.init_params(cfg, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  n = 1 + int(config.rank.beam_size)
  source = int(config.text_tokenizer.max_length)
  inputs = rng.integers(3, vocab.text_vocab_size, (batch, source)).astype(np.int32)
  codes = np.stack([rng.integers(0, size, (batch, n)) for size in vocab.position_sizes()], axis=-1)
  targets = vocab.target_tokens(codes)
  return cfg, params, jnp.asarray(inputs), jnp.asarray(targets)


def measure(spec: str, batch: int, rounds: int) -> list[dict]:
  """One row per form: FLOPs, temporary bytes, compile seconds, median step seconds."""
  cfg, params, inputs, targets = problem(spec, batch)
  key = jax.random.key(1)
  steps: dict[str, Any] = {}
  rows: dict[str, dict[str, Any]] = {}
  for form in FORMS:
    fn = step_fn(form, cfg)
    start = time.perf_counter()
    compiled = fn.lower(params, inputs, targets, key).compile()
    memory = compiled.memory_analysis()
    rows[form] = {
      "form": form,
      "flops_per_step": step_flops(compiled),
      "temp_bytes": int(getattr(memory, "temp_size_in_bytes", 0) or 0),
      "compile_s": time.perf_counter() - start,
      "times": [],
    }
    jax.block_until_ready(compiled(params, inputs, targets, key))  # warm-up
    steps[form] = compiled
  for _ in range(rounds):
    for form in FORMS:  # alternated: a change of machine load hits both forms alike
      start = time.perf_counter()
      jax.block_until_ready(steps[form](params, inputs, targets, key))
      rows[form]["times"].append(time.perf_counter() - start)
  out = []
  for form in FORMS:
    r = rows[form]
    r["step_s"] = float(np.median(r["times"]))
    r["examples_per_s"] = batch / r["step_s"]
    out.append(r)
  return out


def table(rows: list[dict]) -> str:
  base = rows[0]
  lines = [
    "form     | GFLOP/step | temp MiB | step s | examples/s | x per_pair",
    "---------|------------|----------|--------|------------|-----------",
  ]
  for r in rows:
    lines.append(
      f"{r['form']:<8} | {r['flops_per_step'] / 1e9:10.1f} | "
      f"{r['temp_bytes'] / 2**20:8.0f} | {r['step_s']:6.3f} | "
      f"{r['examples_per_s']:10.2f} | {base['step_s'] / r['step_s']:9.2f}"
    )
  return "\n".join(lines)
