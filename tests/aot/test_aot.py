"""`avg-jax compile`: topology names, the per-step arithmetic, and a real TPU compile of the
tiny config for v5e:2x2 when the optional libtpu extra is installed (skipped otherwise).

    TPU_WORKER_HOSTNAMES=localhost .venv-tpu/bin/python -m pytest tests/aot -q -rs   # with libtpu
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from avg_jax import cli
from avg_jax.aot import analysis, topology
from avg_jax.aot.programs import Program
from avg_jax.errors import UserError


def _require_libtpu():
  # Compiling for a TPU topology needs libtpu, the TPU compiler: an optional extra
  # (requirements-tpu.txt, Linux x86-64 only), not in the default test environment, so these
  # two tests run in `.venv-tpu`; every other test in this file runs everywhere.
  if not topology.libtpu_available():
    pytest.skip(
      "TPU compile needs libtpu, an optional extra not installed here: run "
      "`pip install -r requirements-tpu.txt` in a separate venv, then "
      "`.venv-tpu/bin/python -m pytest tests/aot`"
    )


# --- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "name, canonical, chips",
  [
    ("v5e-16", "v5e:4x4", 16),
    ("v4-32", "v4:2x2x4", 16),
    ("v5p-8", "v5p:2x2x1", 4),
    ("V5E:2x2", "v5e:2x2", 4),
    ("v6e-8", "v6e:2x4", 8),
    ("v4:2x2x1", "v4:2x2x1", 4),
  ],
)
def test_topology_names(name, canonical, chips):
  assert topology.canonical_name(name) == canonical
  assert topology.num_chips(name) == chips


@pytest.mark.parametrize("name", ["v5e-12", "v4-7", "v3:2x2", "tpu", "v5e:4"])
def test_bad_topology_names_are_user_errors(name):
  with pytest.raises(UserError, match="--topology"):
    topology.canonical_name(name)


def test_assumed_chips_are_the_stated_ones():
  gib = 1024**3
  assert (topology.chip_of("v5e-16").peak_bf16_flops, topology.chip_of("v5e-16").hbm_bytes) == (
    197e12,
    16 * gib,
  )
  assert (topology.chip_of("v4-32").peak_bf16_flops, topology.chip_of("v4-32").hbm_bytes) == (
    275e12,
    32 * gib,
  )
  assert (topology.chip_of("v5p-8").peak_bf16_flops, topology.chip_of("v5p-8").hbm_bytes) == (
    459e12,
    95 * gib,
  )


# --- arithmetic on a hand-computable program (CPU, 8 fake devices) -----------------------------


def _cpu_mesh():
  return Mesh(np.asarray(jax.devices()[:8]).reshape(8), ("data",))


def test_analyse_matmul_per_device_numbers():
  mesh = _cpu_mesh()
  rows = NamedSharding(mesh, PartitionSpec("data"))
  x = jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=rows)
  w = jax.ShapeDtypeStruct((32, 16), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
  program = Program("matmul", jax.jit(lambda a, b: a @ b, out_shardings=rows), (x, w), 64, "")
  # Per device: x rows 8 x 32 (1024 B) + w (2048 B) in, 8 x 16 (512 B) out; 2*8*32*16 FLOPs;
  # bytes accessed 1024 + 2048 + 512 = 3584.
  chip = topology.Chip(
    "test", peak_bf16_flops=8192e3, hbm_bytes=4096, hbm_bandwidth=1792e3, megacore=False
  )
  r = analysis.analyse(program, mesh, chip, roofline_efficiency=0.5)
  assert (r.argument_bytes, r.output_bytes, r.alias_bytes) == (3072, 512, 0)
  assert r.total_bytes == 3072 + 512 + r.temp_bytes
  assert r.fits == (r.total_bytes <= 4096)
  assert r.flops == r.flops_counted == 8192
  assert r.bytes_accessed == 3584
  assert r.t_at_peak_s == pytest.approx(1e-3)  # 8192 / 8.192e6
  assert r.t_roofline_s == pytest.approx(2e-3)  # 3584 / 1.792e6 > 1 ms
  assert r.t_assumed_s == pytest.approx(4e-3)  # / 0.5
  assert r.mfu_estimate == pytest.approx(0.25)
  assert "matmul" in analysis.format_table([r])


def test_loop_body_correction_adds_uncounted_iterations():
  mesh = _cpu_mesh()
  rep = NamedSharding(mesh, PartitionSpec())
  x = jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=rep)
  w = jax.ShapeDtypeStruct((16, 16), jnp.float32, sharding=rep)
  looped = jax.jit(lambda a, b: jax.lax.fori_loop(0, 3, lambda i, y: y @ b, a))
  body = Program("body", jax.jit(lambda a, b: a @ b), (x, w), 8, "")
  program = Program("loop", looped, (x, w), 8, "", loop_body=body, loop_extra=2)
  chip = topology.Chip("test", 1e12, 1 << 30, 1e12, False)
  r = analysis.analyse(program, mesh, chip, roofline_efficiency=1.0)
  one = 2 * 8 * 16 * 16
  assert r.flops_counted == pytest.approx(one, rel=0.01)  # XLA counts the body once
  assert r.flops == pytest.approx(3 * one, rel=0.01)


def test_out_of_memory_message_is_kept_short():
  error = RuntimeError(
    "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory "
    "in memory space hbm. Used 18.52G of 15.75G hbm. Exceeded hbm capacity "
    "by 2.77G.\n\nTotal hbm usage >= 18.77G:\n  reserved 257.00M"
  )
  assert analysis._resource_exhausted(error) == "RESOURCE_EXHAUSTED: used 18.52G of 15.75G HBM"
  assert analysis._resource_exhausted(ValueError("shapes do not match")) is None


def test_compile_without_libtpu_exits_2_naming_the_extra(monkeypatch, capsys, repo_root):
  monkeypatch.setattr(topology, "libtpu_available", lambda: False)
  code = cli.main(
    ["compile", "--config", str(repo_root / "configs" / "smoke.py:tiny"), "--topology", "v5e:2x2"]
  )
  err = capsys.readouterr().err
  assert code == 2
  assert err.strip().splitlines() == [f"avg-jax: error: {topology.MISSING_LIBTPU}"]
  assert "requirements-tpu.txt" in err


# --- a real TPU compile (libtpu) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_report(repo_root, tmp_path_factory):
  _require_libtpu()
  out = tmp_path_factory.mktemp("aot") / "tiny.json"
  code = cli.main(
    [
      "compile",
      "--config",
      str(repo_root / "configs" / "smoke.py:tiny"),
      "--topology",
      "v5e:2x2",
      "--out",
      str(out),
    ]
  )
  assert code == 0
  return json.loads(out.read_text())


def test_tiny_config_compiles_for_v5e_2x2(tiny_report):
  r = tiny_report
  assert r["topology"] == "v5e:2x2" and r["chips"] == 4
  assert r["mesh"] == {"data": 4, "fsdp": 1, "model": 1}
  assert [s["step"] for s in r["steps"]] == ["tokenizer", "train", "rank", "search"]
  for s in r["steps"]:
    assert s["fits"] and not s["error"], s
    assert 0 < s["total_bytes"] < s["hbm_bytes"] == 16 * 1024**3
    assert s["flops"] > 0 and s["bytes_accessed"] > 0
  steps = {s["step"]: s for s in r["steps"]}
  # The state is donated: the new state aliases the old one.
  assert steps["train"]["alias_bytes"] > 0 and steps["tokenizer"]["alias_bytes"] > 0
  # The search and the LTR step run the P-step decode loop: the correction adds iterations.
  assert steps["search"]["flops"] > steps["search"]["flops_counted"]
  assert steps["rank"]["flops"] > steps["rank"]["flops_counted"]
  # An LTR step trains on 1 + beam targets per query and also searches: more than a train step
  # on as many queries (rank batch 16 vs train batch 32 in the tiny config).
  assert steps["rank"]["flops"] > steps["train"]["flops"] / 2
  assert r["machine"]["libtpu"] != "unknown" and r["machine"]["command"].startswith("avg-jax")


def _train_only(repo_root, out, *overrides):
  # Wide enough that a quarter of the embed dimension still fills TPU tiles (the tiny
  # config's 32 would be padded back up and hide the saving).
  code = cli.main(
    [
      "compile",
      "--config",
      str(repo_root / "configs" / "smoke.py:tiny"),
      "--topology",
      "v5e-4",
      "--out",
      str(out),
      "--config.aot.steps=('train',)",
      "--config.t5.d_model=512",
      "--config.t5.d_ff=1024",
      *overrides,
    ]
  )
  assert code == 0
  report = json.loads(out.read_text())
  return report["mesh"], report["steps"][0]


def test_fsdp_shards_the_train_state(tiny_report, repo_root, tmp_path):
  mesh, data = _train_only(repo_root, tmp_path / "data.json")
  assert mesh == {"data": 4, "fsdp": 1, "model": 1}
  mesh, fsdp = _train_only(repo_root, tmp_path / "fsdp.json", "--config.mesh.fsdp=4")
  assert mesh == {"data": 1, "fsdp": 4, "model": 1}
  # Parameters and Adam moments replicated (data=4) vs their embed dimension split four ways.
  assert fsdp["argument_bytes"] < 0.4 * data["argument_bytes"]
  assert fsdp["flops"] == pytest.approx(data["flops"], rel=0.25)  # same work per device


def test_optimizer_state_follows_parameter_shardings(repo_root):
  from avg_jax import config as config_lib
  from avg_jax import partitioning
  from avg_jax.aot import programs
  from avg_jax.models import t5 as t5_lib
  from avg_jax.training import optim
  from avg_jax.training import state as state_lib

  config = config_lib.load_config(str(repo_root / "configs" / "smoke.py:tiny"), ["mesh.fsdp=4"])
  mesh = partitioning.make_mesh(config.mesh, devices=jax.devices()[:4])
  cfg, _ = programs._t5(config)
  params, param_shardings = t5_lib.abstract_params(cfg, mesh)
  tx = optim.adamw(1e-3, grad_clip_norm=1.0)
  state, shardings = state_lib.abstract_state(params, tx, mesh)
  adam = shardings.opt_state[1][0]
  spec = lambda tree: [s.spec for s in jax.tree.leaves(tree)]
  assert spec(adam.mu) == spec(adam.nu) == spec(param_shardings)
  assert any("fsdp" in str(s) for s in spec(adam.mu))
  assert adam.count.spec == PartitionSpec()
  assert jax.tree.map(lambda a: a.sharding, state) == shardings
