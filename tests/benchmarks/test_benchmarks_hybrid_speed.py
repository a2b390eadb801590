"""benchmarks/hybrid_speed.py on the tiny pipeline: three contenders, one row per N.

One N: each size builds its own index, so each compiles the three contenders' search
programs again (~6 s of CPU per size here); the loop over sizes is the same for one.
"""

import json

from helpers import load_script


def test_hybrid_speed_on_the_tiny_pipeline(repo_root, pipeline_workdir, tmp_path):
  module = load_script(repo_root, "hybrid_speed")
  out = tmp_path / "h.json"
  assert (
    module.main(
      [
        "--workdir",
        str(pipeline_workdir),
        "--config",
        str(repo_root / "configs/smoke.py:tiny"),
        "--weight",
        "4",
        "--sizes",
        "50",
        "--queries",
        "16",
        "--rounds",
        "1",
        "--out",
        str(out),
      ]
    )
    == 0
  )
  result = json.loads(out.read_text())
  assert [r["num_items"] for r in result["rows"]] == [50]
  for row in result["rows"]:
    assert all(row[name] > 0 for name in module.NAMES) and row["max_group"] >= 1
  assert result["weight"] == 4.0 and result["rounds"] == 1
