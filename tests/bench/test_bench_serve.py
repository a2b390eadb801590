"""`avg-jax bench serve --quick`: a short load run against a real server process."""

import json

import pytest
from helpers import use_one_device_subprocesses

from avg_jax import cli
from avg_jax.bench import serve as loadtest


# Its children start while JAX's threads run here: Python code between fork and exec (a
# `preexec_fn`) could deadlock, and JAX warns about every such start.
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_bench_serve_quick(repo_root, serve_export, tmp_path, capsys, monkeypatch):
  # The server and the in-process measurement see one CPU device, as a serving host does.
  use_one_device_subprocesses(monkeypatch)
  # Each level also runs with 4 hostile clients mixed in (one of each kind). Half a second
  # per level, not --quick's 2: every client (honest or hostile) starts its first request at
  # once and its answer is awaited past the level's end, so each check below holds at any
  # duration; the server and the clients are busy for 4 levels x the duration, and the
  # in-process measurement runs that long per batch size.
  assert (
    cli.main(
      [
        "bench",
        "serve",
        "--config",
        str(repo_root / "configs" / "smoke.py:tiny"),
        "--model",
        str(serve_export),
        "--workdir",
        str(tmp_path),
        "--quick",
        "--duration",
        "0.5",
        "--hostile",
        "4",
      ]
    )
    == 0
  )
  out = capsys.readouterr().out
  report = json.loads((tmp_path / "bench_serve.json").read_text())
  assert report["server_exit_code"] == 0
  assert [(lv["clients"], lv.get("hostile", 0)) for lv in report["levels"]] == [
    (1, 0),
    (1, 4),
    (4, 0),
    (4, 4),
  ]
  for lv in report["levels"][1::2]:
    outcomes = lv["hostile_outcomes"]
    # Every upload refused (the index never changed); the slow bodies were sent.
    assert outcomes.get("pixel_bomb 400", 0) > 0 and outcomes.get("slow_body sent", 0) > 0
    assert all(key.endswith((" 400", " sent", "dropped by server")) for key in outcomes), outcomes
  assert "1 + 4 hostile |" in out
  for lv in report["levels"]:
    assert lv["requests"] > 0 and lv["errors"] == 0 and lv["compiles_after_warmup"] == 0
    assert sum(lv["batch_histogram"].values()) > 0
    assert 1 <= lv["mean_batch"] <= 4 and lv["in_process_qps"] > 0
    assert lv["p50_ms"] <= lv["p95_ms"] <= lv["p99_ms"]
  # One client never has a second request to batch with.
  for lv in report["levels"][:2]:
    assert lv["batch_histogram"] == {"1": sum(lv["batch_histogram"].values())}
  assert "clients | requests | errors | q/s" in out and "bench serve: wrote" in out


def test_batch_histogram_from_two_scrapes():
  key = "avg_jax_serve_batch_size_bucket|le="
  before = {key + "1.0": 2.0, key + "2.0": 3.0, key + "3.0": 3.0, key + "+Inf": 3.0}
  after = {key + "1.0": 5.0, key + "2.0": 6.0, key + "3.0": 10.0, key + "+Inf": 10.0}
  assert loadtest._batch_histogram(before, after) == {1: 3, 3: 4}


def test_clients_must_be_positive_integers():
  import pytest

  from avg_jax.errors import UserError

  assert loadtest._parse_clients("1, 8,64") == [1, 8, 64]
  for bad in ("", "0", "a,b", "-1"):
    with pytest.raises(UserError, match="--clients"):
      loadtest._parse_clients(bad)
