"""Dynamic batching and SIGTERM drain, made deterministic with a batching window of an hour:
a batch can then only leave because its bucket is full or because the server drains."""

import concurrent.futures
import time
import urllib.error

import pytest

HOUR_MS = "3600000"


def _wait_for(condition, what):
  # Polls state the server reports; the bound only stops a hung test.
  deadline = time.monotonic() + 300
  while not condition():
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    time.sleep(0.05)


@pytest.fixture(scope="module")
def slow_window_server(start_server, serve_export):
  return start_server(serve_export, "--batch-wait-ms", HOUR_MS)


def test_requests_are_gathered_until_the_bucket_is_full(slow_window_server, retriever):
  server = slow_window_server
  batches_before = server.metric("avg_jax_serve_batch_size_count")
  queries = [[f"a red circle number {r} {i}" for i in range(2)] for r in range(4)]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    answers = list(pool.map(lambda qs: server.search(qs, k=2), queries))
  # 4 requests x 2 queries filled the largest bucket (8): one device call, no waiting.
  assert server.metric("avg_jax_serve_batch_size_count") == batches_before + 1
  assert server.metric("avg_jax_serve_batch_size_sum") == 8
  for (status, response), qs in zip(answers, queries):
    assert status == 200
    ids, _ = retriever.search(qs, k=2)
    assert [[it["image_id"] for it in r["items"]] for r in response["results"]] == ids.tolist()


def test_sigterm_answers_in_flight_requests_then_exits_0(slow_window_server, retriever):
  server = slow_window_server
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    pending = pool.submit(server.search, ["a blue square", "a green cross"], 3)
    # The request waits in the queue: its window is an hour and its bucket is far from full.
    _wait_for(lambda: server.metric("avg_jax_serve_queued_queries") == 2, "the queued request")
    assert server.metric("avg_jax_serve_in_flight_requests") == 1
    assert server.stop() == 0
    status, response = pending.result()
  assert status == 200
  ids, _ = retriever.search(["a blue square", "a green cross"], k=3)
  assert [[it["image_id"] for it in r["items"]] for r in response["results"]] == ids.tolist()
  log = server.output()
  assert "draining 1 in-flight requests" in log and "serve: stopped" in log
  assert "Traceback" not in log
  with pytest.raises(urllib.error.URLError):
    server.request("GET", "/healthz")
