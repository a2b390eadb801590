"""`avg-jax bench decode`: the FLOP count against XLA's own count, the reference trie, and a
quick end-to-end run that writes bench_decode.json."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avg_jax import cli
from avg_jax.bench import decode as bench
from avg_jax.models import t5 as t5_lib
from avg_jax.models.t5_config import T5Config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _xla_flops(fn, *args) -> float:
  # XLA's HLO cost analysis of the lowered module (before its optimisations): the FLOPs do not
  # depend on the parameters' values, so `args` may be shapes, and nothing is compiled (a
  # compile of each piece cost ~5 s of this test's ~6 s per variant).
  cost = jax.jit(fn).lower(*args).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


@pytest.mark.parametrize("gated", [False, True])
def test_flop_count_matches_xla(gated):
  # XLA counts every op of the search's pieces (matmuls, softmaxes, norms, ...); ours counts
  # matmuls only, so XLA's count must be a little larger, never smaller. The model is wide
  # enough for matmuls to dominate.
  cfg = T5Config(
    vocab_size=2048,
    num_voken_tokens=1024,
    d_model=128,
    d_kv=32,
    d_ff=512,
    num_heads=4,
    num_encoder_layers=2,
    num_decoder_layers=2,
    dropout_rate=0.0,
    feed_forward="gated-gelu" if gated else "relu",
    tie_embeddings=not gated,
  )
  params = {"params": jax.eval_shape(lambda: t5_lib.init_params(cfg, jax.random.key(0)))}
  b, s, beam, p = 4, 12, 3, 4
  tokens = jnp.ones((b, s), jnp.int32)
  prep = lambda pr, t: t5_lib.init_decode_state(pr, cfg, t5_lib.encode(pr, cfg, t), t, p + 1)
  xla = _xla_flops(prep, params, tokens)
  step = lambda pr, tok, c: t5_lib.decode_step(pr, cfg, tok, c)[0]
  for rows, times in ((b, 1), (b * beam, p)):  # step 0 on one beam, then P steps on all
    cache = jax.eval_shape(
      lambda pr, rows=rows: jax.tree.map(lambda x: jnp.repeat(x, rows // b, 0), prep(pr, tokens)),
      params,
    )
    xla += times * _xla_flops(step, params, jnp.zeros((rows,), jnp.int32), cache)
  ours = bench.search_flops(cfg, b, s, beam, p, cfg.vocab_size)
  assert ours["decoder_rows"] == b + p * b * beam
  assert ours["total"] == ours["encoder"] + ours["cross_kv"] + ours["decoder"]
  assert 1.0 <= xla / ours["total"] < 1.05, (xla, ours)


def test_reference_dict_trie():
  trie = bench._DictTrie(np.asarray([[5, 7], [5, 8], [6, 7]]))
  assert trie.allowed([0]) == [5, 6]
  assert trie.allowed([0, 5]) == [7, 8]
  assert trie.allowed([0, 5, 8]) == [1]  # EOS after a full identifier
  assert trie.allowed([0, 6, 8]) == []


@pytest.mark.slow
def test_bench_decode_quick(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(REPO_ROOT)
  # One timed round after each contender's warm-up call instead of the benchmark's 5: every
  # figure asserted below exists after one (a median of one); more rounds only steady the
  # numbers, at ~0.5 s of search each.
  race = bench._race
  monkeypatch.setattr(bench, "_race", lambda fns, rounds: race(fns, 1))
  argv = [
    "bench",
    "decode",
    "--config",
    "configs/smoke.py:tiny",
    "--workdir",
    str(tmp_path),
    "--quick",
  ]
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  assert "GFLOP/s" in out and "unconstrained" in out
  with open(os.path.join(tmp_path, "bench_decode.json")) as f:
    record = json.load(f)
  assert record["command"] == "avg-jax " + " ".join(argv)
  assert {"processor", "cpu_count", "jax", "date"} <= set(record["machine"])
  kinds = [(r["kind"], r["model"], r["n"]) for r in record["rows"]]
  assert kinds == [
    ("search", "tiny", 5000),
    ("search voken_logits_only", "tiny", 5000),
    ("unconstrained", "tiny", 0),
    ("index", "tiny", 1000),
    ("index", "tiny", 10000),
  ]
  for r in record["rows"]:
    assert r["qps"] > 0
  search = record["rows"][0]
  assert 0 < search["matmul_fraction"] and search["gflop_per_query"] > 0
  assert record["rows"][3]["bytes_per_image"] > 0 and record["rows"][4]["build_s"] >= 0
  assert record["summary"]["matmul_gflop_per_s"] > 0
  assert all(
    set(g) == {"goal", "measured", "met", "detail"} for g in record["summary"]["goals"].values()
  )
  from avg_jax.bench import reference_worker

  if reference_worker.available():
    assert search["ref_uncached"] > 0 and search["ref_cached"] > 0
    # same weights, same trie: the reference and ours agree on the top result
    assert record["models"]["tiny"]["top1_agreement"] >= 0.9
