"""benchmarks/suite_compiles.py: the report's arithmetic on hand-written compile records."""

import json

from helpers import load_script


def _r(test, name, digest, seconds):
  return {"test": test, "name": name, "hash": digest, "devices": 8, "seconds": seconds}


def test_recompiles_count_within_a_process_only(repo_root, tmp_path, capsys):
  script = load_script(repo_root, "suite_compiles")
  worker_a = [
    _r("t1", "jit_step", "h1", 2.0),
    _r("t1", "jit_init", "h2", 1.0),
    _r("t2", "jit_step", "h1", 2.5),
  ]  # the same program again: a recompile
  worker_b = [
    _r("t3", "jit_step", "h1", 3.0),  # another process: compiles its own
    {"test": "t3", "phase": "trace", "seconds": 1.0},
    {"test": "t3", "phase": "lower", "seconds": 0.5},
    {"test": "t3", "phase": "trace", "seconds": 0.5},
  ]
  summary = script.summarise({"gw0": worker_a, "gw1": worker_b})
  assert summary["compiles"] == 4 and summary["compile_s"] == 8.5
  assert summary["trace_s"] == 1.5 and summary["lower_s"] == 0.5
  assert summary["recompiles"] == 1 and summary["recompile_s"] == 2.5
  assert summary["recompiled_programs"] == [{"name": "jit_step", "count": 1, "seconds": 2.5}]
  by_test = {r["test"]: (r["compile_s"], r["recompile_s"]) for r in summary["top_tests"]}
  assert by_test == {"t1": (3.0, 0.0), "t2": (2.5, 2.5), "t3": (3.0, 0.0)}

  folder = tmp_path / "records"
  folder.mkdir()
  for name, records in (("gw0", worker_a), ("gw1", worker_b)):
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  out = tmp_path / "s.json"
  assert script.main(["--dir", str(folder), "--out", str(out)]) == 0
  assert json.loads(out.read_text())["recompile_s"] == 2.5
  out_text = capsys.readouterr().out
  assert "recompiles of an identical program 1, 2.5 s" in out_text
  assert "tracing 1.5 s, lowering to MLIR 0.5 s" in out_text
  assert script.main(["--dir", str(tmp_path / "empty"), "--out", str(out)]) == 2
