"""benchmarks/identifier_bound.py: the ceilings computed by hand on toy codes, and the script on
the tiny workdir (read-only)."""

import json

import numpy as np
from helpers import load_script


def test_ceilings_by_hand(repo_root):
  module = load_script(repo_root, "identifier_bound")
  # Images 0 and 1 share a code; 2 and 3 have codes of their own.
  codes = np.array([[1, 2], [1, 2], [1, 3], [4, 2]])
  # Captions of images 0, 0, 2, 3: 1/2, 1/2, 1, 1 -> mean 0.75.
  caption_image = np.array([0, 0, 2, 3])
  assert module.perfect_generator_r1(codes, caption_image) == 75.0
  assert module.collision_share(codes) == 50.0
  scores = np.array(
    [
      [0.9, 0.1, 0.0, 0.2],  # caption of image 0: first
      [0.5, 0.5, 0.9, 0.0],  # of image 0: the tie 0 = 1 goes to row 0, 2nd
      [0.3, 0.2, 0.1, 0.0],  # of image 2: 3rd
      [0.0, 0.0, 0.0, 0.0],
    ]
  )  # of image 3: all tied, last
  r = module.recall_at(scores, caption_image, ks=(1, 2, 3))
  assert r == {1: 25.0, 2: 50.0, 3: 75.0}


def test_script_on_the_tiny_workdir(repo_root, tiny_workdir, tmp_path, capsys):
  module = load_script(repo_root, "identifier_bound")
  out = tmp_path / "b.json"
  assert (
    module.main(
      [
        "--workdir",
        str(tiny_workdir),
        "--config",
        str(repo_root / "configs" / "smoke.py:tiny"),
        "--splits",
        "val,test",
        "--out",
        str(out),
      ]
    )
    == 0
  )
  rows = json.loads(out.read_text())["rows"]
  assert [r["split"] for r in rows] == ["val", "test"]
  for r in rows:
    # The perfect generator is at most a code's group away from R@1 = 100, and the decoded
    # ranking can only see what the codes keep: both are recalls in [0, 100].
    assert 0.0 < r["perfect_generator_r1"] <= 100.0
    assert r["perfect_generator_r1"] == 100.0 or r["collision"] > 0.0
    for k in ("1", "5", "10"):
      assert 0.0 <= r["decoded"][k] <= r["decoded"]["10"] <= 100.0
      assert 0.0 <= r["two_tower"][k] <= 100.0
  assert "perfect generator R@1" in capsys.readouterr().out
  assert module.main(["--workdir", str(tmp_path / "none"), "--out", str(tmp_path / "x.json")]) == 2
  assert not (tmp_path / "x.json").exists()
