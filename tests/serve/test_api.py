"""`avg-jax serve` end to end against a real server process: results equal the in-process
Retriever, every bad request gets its 4xx naming the field and the server stays healthy, the
page and its files are served, nothing compiles after warm-up."""

import concurrent.futures
import json
import socket

import numpy as np
import pytest

QUERIES = [
  "a small purple triangle",
  "a large blue square near the bottom",
  "two shapes: a red circle and a green cross",
  "white",
  "a picture with a small orange diamond in the top right corner and one other shape",
  "yellow things",
  "   padded   query   ",
  "ÜnïcødÉ çircle ✓",
]


def _check_same(response, retriever, queries, k):
  ids, scores = retriever.search(queries, k=k)
  assert [r["query"] for r in response["results"]] == queries
  for row, (row_ids, row_scores) in enumerate(zip(ids, scores)):
    items = response["results"][row]["items"]
    want = [(int(i), float(s)) for i, s in zip(row_ids, row_scores) if i >= 0]
    assert [it["image_id"] for it in items] == [i for i, _ in want], (queries[row], k)
    np.testing.assert_allclose(
      [it["score"] for it in items], [s for _, s in want], rtol=1e-5, atol=1e-5
    )
    assert [it["rank"] for it in items] == list(range(1, len(items) + 1))


@pytest.mark.parametrize("k", [1, 3, 5, 6])
def test_search_equals_retriever(server, retriever, k):
  # k <= 5 is served by truncating the beam-5 program; 6 runs a program of its own.
  status, response = server.search(QUERIES, k=k)
  assert status == 200, response
  assert response["k"] == k
  _check_same(response, retriever, QUERIES, k)


def test_concurrent_requests_each_get_their_own_results(server, retriever):
  # Many single-query requests at once are batched together; each answer is still its own.
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    answers = list(pool.map(lambda q: server.search([q], k=3), QUERIES * 4))
  for (status, response), q in zip(answers, QUERIES * 4):
    assert status == 200, response
    _check_same(response, retriever, [q], 3)


def test_result_items_carry_file_names_captions_and_thumbnails(server, retriever):
  from avg_jax.inference import gallery as gallery_lib

  gallery = gallery_lib.read(str(server_model(server)))
  status, response = server.search(["a red circle"])
  assert status == 200
  items = response["results"][0]["items"]
  # The default k: the export's decode.top_k, capped at --max-k.
  assert response["k"] == len(items) == min(retriever.manifest["decode"]["top_k"], 6)
  for item in items:
    assert item["file_name"] == retriever.file_name(item["image_id"])
    assert item["file_name"].startswith("test/")
    assert item["captions"] == gallery.captions(item["image_id"]) and item["captions"]
    status, headers, body = server.request("GET", item["image_url"])
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert body == gallery.thumbnail(item["image_id"])[0] and body[:4] == b"\x89PNG"


def server_model(server):
  args = server.proc.args
  return args[args.index("--model") + 1]


BAD_SEARCHES = [
  # (body, status, field)
  (b"{not json", 400, "body"),
  (b"\xff\xfe{}", 400, "body"),
  (b"[" * 100_000 + b"]" * 100_000, 400, "body"),
  (b'["a red circle"]', 400, "body"),
  (b"null", 400, "body"),
  (b"{}", 400, "queries"),
  (b'{"queries": "a red circle"}', 400, "queries"),
  (b'{"queries": []}', 400, "queries"),
  (json.dumps({"queries": ["a"] * 65}).encode(), 400, "queries"),
  (b'{"queries": [""]}', 400, "queries[0]"),
  (b'{"queries": ["fine", "  \\t "]}', 400, "queries[1]"),
  (json.dumps({"queries": ["x" * 1001]}).encode(), 400, "queries[0]"),
  (b'{"queries": [3]}', 400, "queries[0]"),
  (b'{"queries": [null]}', 400, "queries[0]"),
  (b'{"queries": [["nested"]]}', 400, "queries[0]"),
  (b'{"queries": ["\\ud800 lone surrogate"]}', 400, "queries[0]"),
  (b'{"queries": ["a"], "k": 0}', 400, "k"),
  (b'{"queries": ["a"], "k": -1}', 400, "k"),
  (b'{"queries": ["a"], "k": 7}', 400, "k"),  # over --max-k
  (b'{"queries": ["a"], "k": 41}', 400, "k"),  # over the index size (40)
  (b'{"queries": ["a"], "k": 99999999999999999999999}', 400, "k"),
  (b'{"queries": ["a"], "k": true}', 400, "k"),
  (b'{"queries": ["a"], "k": 2.5}', 400, "k"),
  (b'{"queries": ["a"], "k": "3"}', 400, "k"),
  (b'{"queries": ["a"], "top_k": 3}', 400, "top_k"),
  (b'{"queries": ["' + b"a" * (1 << 20) + b'"]}', 413, "body"),
]


@pytest.mark.parametrize(
  "body,status,field", BAD_SEARCHES, ids=[f"{i}-{f}" for i, (_, _, f) in enumerate(BAD_SEARCHES)]
)
def test_bad_search_is_a_4xx_naming_the_field(server, body, status, field):
  got, headers, raw = server.request(
    "POST", "/v1/search", body, {"Content-Type": "application/json"}
  )
  assert got == status, raw[:300]
  assert headers["Content-Type"].startswith("application/json")
  error = json.loads(raw)["error"]
  assert error["field"] == field and error["message"]
  assert server.request("GET", "/healthz")[0] == 200


@pytest.mark.parametrize(
  "method,path,status,field",
  [
    ("GET", "/v1/images/abc", 400, "id"),
    ("GET", "/v1/images/99999999999999999999999", 400, "id"),
    ("GET", "/v1/images/123456789", 404, "id"),
    ("GET", "/v1/images/-1", 400, "id"),
    ("GET", "/v1/images/%D9%A3", 400, "id"),  # an Arabic-Indic digit
    ("GET", "/v1/images/1_0", 400, "id"),
    ("GET", "/v1/images/" + "9" * 5000, 400, "id"),
    ("GET", "/v1/nothing", 404, "path"),
    ("GET", "/static/../../etc/passwd", 404, "path"),
    ("GET", "/static/index.html", 404, "path"),
    ("GET", "/v1/search", 405, "method"),
    ("PUT", "/v1/images/1", 405, "method"),
    # DELETE is the live index's removal (tests/serve/test_live_api.py): this server is
    # read-only (the default), so it is refused before the id is read.
    ("DELETE", "/v1/images/abc", 403, None),
    ("DELETE", "/v1/images/123456789", 403, None),
    ("POST", "/v1/images", 403, None),
  ],
)
def test_bad_paths_and_methods(server, method, path, status, field):
  got, headers, raw = server.request(method, path)
  assert got == status, raw[:300]
  assert json.loads(raw)["error"]["field"] == field
  assert server.request("GET", "/healthz")[0] == 200


def _raw(server, data: bytes, *, half_close: bool = True, close_early: bool = False) -> bytes:
  """Sends raw bytes; returns what the server answered up to the end of its first header
  block (b"" if it closed the connection without answering)."""
  host, port = server.url.removeprefix("http://").split(":")
  with socket.create_connection((host, int(port)), timeout=60) as s:
    s.sendall(data)
    if close_early:
      return b""
    if half_close:
      s.shutdown(socket.SHUT_WR)
    reply = b""
    while b"\r\n\r\n" not in reply and (chunk := s.recv(65536)):
      reply += chunk
    return reply


def test_broken_http_does_not_hurt_the_server(server, retriever):
  reply = _raw(server, b"\x00\x01garbage that is not HTTP\r\n\r\n")
  # aiohttp's parser answers 400 (plain text: the app never sees it) or drops the connection.
  assert reply == b"" or b" 400 " in reply.split(b"\r\n")[0]
  # A body shorter than its Content-Length, then the client goes away.
  _raw(
    server,
    b'POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"que',
    close_early=True,
  )
  # An absurd Content-Length is refused before any body is read.
  reply = _raw(
    server,
    b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n",
    half_close=False,
  )
  assert b" 413 " in reply.split(b"\r\n")[0]
  # A client that stops halfway through its headers holds only its own connection.
  host, port = server.url.removeprefix("http://").split(":")
  with socket.create_connection((host, int(port)), timeout=60) as stalled:
    stalled.sendall(b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Le")
    assert server.request("GET", "/healthz")[0] == 200
    status, response = server.search(["a red circle"], k=2)
    assert status == 200
    _check_same(response, retriever, ["a red circle"], 2)


def test_page_info_and_static_files(server, retriever):
  status, headers, body = server.request("GET", "/")
  assert status == 200 and headers["Content-Type"].startswith("text/html")
  assert b'id="query"' in body and b"/static/page.js" in body and b"http" not in body
  for name, kind in (("page.js", "text/javascript"), ("page.css", "text/css")):
    status, headers, body = server.request("GET", f"/static/{name}")
    assert status == 200 and headers["Content-Type"].startswith(kind) and body
  info = json.loads(server.request("GET", "/v1/info")[2])
  default_k = min(retriever.manifest["decode"]["top_k"], 6)
  assert info == {
    "num_images": 40,
    "default_k": default_k,
    "max_k": 6,
    "max_queries": 64,
    "max_query_chars": 1000,
    "batch_buckets": [1, 8],
    "thumbnails": True,
    "writes": "read-only",
    "scheme": "avg",
    "source_stage": retriever.manifest["source_stage"],
  }


def test_metrics_and_no_compile_after_warmup(server):
  # Batch sizes at and around each bucket (1, 8), above the largest (split into several
  # calls) up to 40, and every k.
  for n in (1, 2, 7, 8, 9, 15, 16, 17, 40):
    for k in (1, 5, 6):
      status, response = server.search([f"query {i} a red circle" for i in range(n)], k=k)
      assert status == 200 and len(response["results"]) == n
  _, headers, body = server.request("GET", "/metrics")
  assert headers["Content-Type"].startswith("text/plain")
  text = body.decode()
  for name in (
    "avg_jax_serve_requests_total",
    "avg_jax_serve_request_seconds_bucket",
    "avg_jax_serve_batch_size_bucket",
    "avg_jax_serve_device_seconds_count",
    "avg_jax_serve_queries_total",
  ):
    assert name in text, name
  assert 'route="/v1/search",status="200"' in text
  assert server.metric("avg_jax_serve_xla_compiles_total") > 0  # the warm-up's
  assert server.metric("avg_jax_serve_xla_compiles_after_warmup_total") == 0
  assert server.metric("avg_jax_serve_index_images") == 40
  # 2 buckets x 2 k programs (5, 6), compiled once each at start and logged.
  log = server.output()
  assert "warm-up compiled buckets [1, 8] x k programs [5, 6]" in log
  assert "a second pass compiled 0" in log
