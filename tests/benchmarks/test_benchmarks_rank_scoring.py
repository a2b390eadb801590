"""benchmarks/rank_scoring.py at tiny size: both scoring forms measured, packed costs fewer
FLOPs."""

import json

import pytest
from helpers import load_script


@pytest.mark.slow
def test_benchmark_writes_both_forms(repo_root, tmp_path, capsys):
  out = tmp_path / "r.json"
  assert (
    load_script(repo_root, "rank_scoring").main(
      [
        "--config",
        str(repo_root / "configs/smoke.py:tiny"),
        "--batch",
        "2",
        "--rounds",
        "2",
        "--out",
        str(out),
      ]
    )
    == 0
  )
  rows = {r["form"]: r for r in json.loads(out.read_text())["rows"]}
  assert set(rows) == {"per_pair", "packed"}
  for r in rows.values():
    assert r["step_s"] > 0 and len(r["times"]) == 2 and r["flops_per_step"] > 0
  # XLA's count: the packed form does not run the encoder once per candidate.
  assert rows["packed"]["flops_per_step"] < rows["per_pair"]["flops_per_step"]
  assert "x per_pair" in capsys.readouterr().out
