"""benchmarks/data_growth.py at a tiny N: prepare and embed measured on generated Karpathy data."""

import json

import pytest
from helpers import load_script, use_one_device_subprocesses

from avg_jax.bench import growth


def test_splits():
  assert growth.splits_of(1000) == (900, 50, 50)
  assert growth.splits_of(3) == (1, 1, 1)
  with pytest.raises(ValueError, match="at least 3 images"):
    growth.splits_of(2)


@pytest.mark.slow
def test_growth_at_a_tiny_size(repo_root, tmp_path, capsys, monkeypatch):
  # The stage subprocesses see one CPU device, as a user's host does.
  use_one_device_subprocesses(monkeypatch)
  out = tmp_path / "g.json"
  assert (
    load_script(repo_root, "data_growth").main(
      [
        "--sizes",
        "40",
        "--root",
        str(tmp_path / "runs"),
        "--out",
        str(out),
        "--config",
        str(repo_root / "configs/karpathy_local.py:tiny,captions=5"),
        # embed imports a pretrained (tiny, committed) CLIP instead of training an encoder:
        # compiling the encoder's init and train step was 2/3 of the test's CPU, and the rows
        # measure the same two stage processes either way. The trained-encoder embed is
        # tested in tests/stages/test_stages_embed.py::test_trained_encoder_stage.
        "--encoder-steps",
        "0",
        "--override",
        f"encoder.pretrained_path={repo_root / 'tests/fixtures/clip_tiny_a'}",
        "--photo",
        "24x18",
        "--render",
        "16",
      ]
    )
    == 0
  )
  (row,) = json.loads(out.read_text())["rows"]
  assert row["images"] == 40 and row["splits"] == [36, 2, 2]
  for stage in ("prepare", "embed"):
    assert row[stage]["wall_s"] > 0 and row[stage]["peak_rss_mib"] > 50
  assert set(row["prepare"]["build_seconds"]) == {
    "assemble",
    "pseudo_queries",
    "text_tokenizer",
    "statistics",
  }
  assert 0 < row["embed"]["extraction_s"] < row["embed"]["wall_s"]
  assert not (tmp_path / "runs" / "n40").exists()  # removed unless --keep
  assert "statistics s" in capsys.readouterr().out
