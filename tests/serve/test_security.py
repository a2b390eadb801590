"""The service probed as a hostile client would: writes closed by default and guarded by a
token and the Origin header; uploads decoded out of process with time and pixel budgets (an
EPS that loops, a decompression bomb, a decoder that hangs: 400s naming the image while
/healthz answers); ids and lengths bounded; client hang-ups not counted as server errors; a
damaged live index a 500 with a clear message; start-up errors one line before loading."""

import base64
import dataclasses
import io
import json
import os
import socket
import threading

import pytest
from PIL import Image

from avg_jax import cli

EPS_LOOP = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n{} loop\n"


def _b64(data: bytes) -> str:
  return base64.b64encode(data).decode()


def _png(size=(24, 24), mode="RGB") -> bytes:
  buffer = io.BytesIO()
  Image.new(mode, size).save(buffer, format="PNG")
  return buffer.getvalue()


def _post(server, images, headers=None, raw=None):
  body = raw if raw is not None else json.dumps({"images": images}).encode()
  status, _, reply = server.request("POST", "/v1/images", body, headers or {})
  return status, json.loads(reply)


def _auth(server):
  return {"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"}


def _num_images(server) -> int:
  return json.loads(server.request("GET", "/v1/info")[2])["num_images"]


def test_read_only_by_default_even_for_a_cross_site_post(server):
  info = json.loads(server.request("GET", "/v1/info")[2])
  assert info["writes"] == "read-only"
  # The case: a page on another site makes the browser send a text/plain POST.
  body = json.dumps({"images": [{"data": _b64(_png())}]}).encode()
  for method, path, data in (("POST", "/v1/images", body), ("DELETE", "/v1/images/1", None)):
    status, _, reply = server.request(
      method, path, data, {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    )
    assert status == 403, reply
    assert json.loads(reply)["error"]["message"].startswith("this server is read-only")
  assert _num_images(server) == info["num_images"]


def test_writes_need_the_token_and_the_servers_own_origin(writable_server):
  server, before = writable_server, _num_images(writable_server)
  image = [{"data": _b64(_png())}]
  cases = [
    ({}, 401, "Authorization"),
    ({"Authorization": "Bearer wrong-token-0123456789"}, 401, "Authorization"),
    ({"Authorization": server.token}, 401, "Authorization"),  # no scheme
    ({"Origin": "http://evil.example", "Content-Type": "text/plain"}, 403, "Origin"),
    (
      {**_auth(server), "Origin": "http://evil.example", "Content-Type": "text/plain"},
      403,
      "Origin",
    ),
    ({**_auth(server), "Origin": "null"}, 403, "Origin"),
  ]
  for headers, status, field in cases:
    got, reply = _post(server, image, headers)
    assert (got, reply["error"]["field"]) == (status, field), (headers, reply)
    got, _, reply = server.request("DELETE", "/v1/images/1", None, headers)
    assert got == status, (headers, reply)
  info = json.loads(server.request("GET", "/v1/info")[2])
  assert info["writes"] == "token" and info["num_images"] == before


def test_bad_uploads_are_400s_naming_the_image_and_never_freeze_the_server(
  writable_server, tmp_path
):
  server, before = writable_server, _num_images(writable_server)
  probe = tmp_path / "probe.png"
  probe.write_bytes(_png())
  outside = (
    f'<svg xmlns="http://www.w3.org/2000/svg"><image href="{probe}" width="9" height="9"/></svg>'
  ).encode()
  bomb = _png((20_000, 20_000), "L")  # 400 M pixels in 390 KB
  for images, field, message in (
    (
      [{"data": _b64(EPS_LOOP)}],
      "images[0].data",
      "not an image in a format avg-jax reads (PNG, JPEG, WebP or SVG)",
    ),
    (
      [{"data": _b64(_png())}, {"data": _b64(bomb)}],
      "images[1].data",
      "too large (400000000 pixels; the limit is 40000000)",
    ),
    (
      [{"data": _b64(outside)}],
      "images[0].data",
      # The reply quotes at most 80 characters of the reference, so a long temporary path
      # is cut: the expectation cuts it the same way.
      f"unsupported SVG: refers to {str(probe)[:80]!r} outside the document (href)",
    ),
    ([{"data": _b64(b"<svg")}], "images[0].data", "cannot decode (SVG: unclosed token at line 1)"),
    ([{"data": ""}], "images[0].data", "empty (0 bytes)"),
  ):
    status, reply = _post(server, images, _auth(server))
    assert (status, reply["error"]) == (400, {"field": field, "message": message}), reply
  # A decoder that never returns: killed after the server's --image-timeout; the server
  # answers meanwhile.
  answer = {}
  hanging = [{"data": _b64(_png())}, {"data": _b64(b"HANG forever")}]
  worker = threading.Thread(
    target=lambda: answer.update(reply=_post(server, hanging, _auth(server)))
  )
  worker.start()
  try:
    assert server.request("GET", "/healthz")[0] == 200
    status, response = server.search(["a red circle"], k=2)
    assert status == 200
  finally:
    worker.join()
  status, reply = answer["reply"]
  stopped = f"took longer than {server.image_timeout} s to decode (stopped)"
  assert (status, reply["error"]) == (400, {"field": "images[1].data", "message": stopped})
  # Lengths and ids.
  png = _b64(_png())
  for images, field, message in (
    (
      [{"data": png, "file_name": "x" * 100_000}],
      "images[0].file_name",
      "100000 characters, the limit is 1024",
    ),
    (
      [{"data": png, "captions": ["c" * 2001]}],
      "images[0].captions[0]",
      "2001 characters, the limit is 2000",
    ),
    ([{"data": png, "captions": ["c"] * 33}], "images[0].captions", "33 captions, the limit is 32"),
    ([{"data": png, "id": 2**31}], "images[0].id", "expected an integer in [0, 2147483647]"),
    ([{"data": png, "id": "\u0663"}], "images[0].id", "expected an integer in [0, 2147483647]"),
  ):
    status, reply = _post(server, images, _auth(server))
    assert (status, reply["error"]) == (400, {"field": field, "message": message}), reply
  status, reply = _post(
    server, None, _auth(server), raw=b'{"images": [{"data": "", "id": ' + b"9" * 5000 + b"}]}"
  )
  assert status == 400 and reply["error"]["field"] == "body"
  for path, status in (
    ("/v1/images/%D9%A3%D9%A6%D9%A0%D9%A3", 400),
    ("/v1/images/1_0", 400),
    ("/v1/images/+1", 400),
    ("/v1/images/" + "9" * 5000, 400),
    ("/v1/images/2147483648", 400),
    ("/v1/images/2147483647", 404),
  ):
    got, _, reply = server.request("DELETE", path, None, _auth(server))
    assert (got, json.loads(reply)["error"]["field"]) == (status, "id"), (path, reply)
  assert _num_images(server) == before


def test_a_client_hanging_up_is_not_a_server_error(writable_server):
  server = writable_server
  host, port = server.url.removeprefix("http://").split(":")
  for path in (b"/v1/search", b"/v1/images"):
    with socket.create_connection((host, int(port)), timeout=60) as s:
      s.sendall(
        b"POST "
        + path
        + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + server.token.encode()
        + b'\r\nContent-Length: 1000\r\n\r\n{"que'
      )
  for _ in range(600):  # the server notices the closed connections
    text = server.metrics_text()
    if text.count('status="499"') >= 2:
      break
    threading.Event().wait(0.1)
  lines = [line for line in text.splitlines() if line.startswith("avg_jax_serve_requests_total")]
  assert any('route="/v1/search",status="499"' in line for line in lines), lines
  assert any('route="/v1/images",status="499"' in line for line in lines), lines
  assert not any('status="500"' in line for line in lines), lines
  assert "unhandled error" not in server.output()


def test_a_damaged_live_index_is_a_server_error(writable_server):
  server, current = writable_server, writable_server.model / "live" / "CURRENT"
  saved = current.read_bytes() if current.exists() else None
  current.parent.mkdir(exist_ok=True)
  current.write_text('{"version": 987}')  # names a version nobody wrote
  try:
    status, _, reply = server.request("DELETE", "/v1/images/2147483647", None, _auth(server))
  finally:
    if saved is None:
      os.remove(current)
    else:
      current.write_bytes(saved)
  error = json.loads(reply)["error"]
  assert status == 500 and error["message"].startswith("the server's live index is damaged")
  assert str(server.model) not in error["message"]  # the path is in the log only
  assert "the live index is damaged: " in server.output()


def _serve(capsys, *args):
  code = cli.main(["serve", *args])
  err = capsys.readouterr().err.strip()
  return code, err


def test_start_up_errors_are_one_line_before_loading(tmp_path, capsys, monkeypatch):
  from avg_jax.inference import retriever
  from avg_jax.models.t5_config import T5Config

  monkeypatch.setattr(retriever.Retriever, "load", lambda *a, **k: pytest.fail("loaded"))
  # A manifest with a key this version does not know (written by a newer one, or edited).
  model = str(tmp_path / "export")
  os.makedirs(model)
  with open(os.path.join(model, "manifest.json"), "w") as f:
    json.dump(
      {
        "format": "avg-jax-serving",
        "format_version": 1,
        "scheme": "avg",
        "t5": {**dataclasses.asdict(T5Config(vocab_size=8)), "t5_new_setting": 1},
        "vocab": {},
        "decode": {},
        "limits": {},
      },
      f,
    )
  assert _serve(capsys, "--model", model, "--port", "70000") == (
    2,
    "avg-jax: error: serve --port: must be in [0, 65535], got 70000",
  )
  assert _serve(capsys, "--model", str(tmp_path), "--port", "0") == (
    2,
    f"avg-jax: error: not an avg-jax serving checkpoint (no manifest.json): {tmp_path}",
  )
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    assert _serve(capsys, "--model", model, "--port", str(port)) == (
      2,
      f"avg-jax: error: serve: cannot listen on 127.0.0.1:{port} (Address already in use)",
    )
  monkeypatch.delenv("AVG_JAX_WRITE_TOKEN", raising=False)
  code, err = _serve(capsys, "--model", model, "--allow-writes")
  assert code == 2 and err.startswith(
    "avg-jax: error: serve --allow-writes needs a bearer "
    "token: --write-token-file FILE or $AVG_JAX_WRITE_TOKEN"
  )
  (tmp_path / "short").write_text("abc\n")
  code, err = _serve(
    capsys, "--model", model, "--allow-writes", "--write-token-file", str(tmp_path / "short")
  )
  assert (code, err) == (
    2,
    f"avg-jax: error: serve: the write token in {tmp_path}/short must "
    f"be at least 16 printable ASCII characters",
  )
  code, err = _serve(capsys, "--model", model, "--port", "0")
  assert code == 2 and "\n" not in err
  assert err.startswith(
    f"avg-jax: error: {model}/manifest.json: unknown key "
    f"t5.t5_new_setting (not a setting of this avg-jax"
  )


def test_sigterm_drains_while_a_decoder_hangs(writable_server):
  # Last in this file: it stops the shared writable server.
  server, answer = writable_server, {}
  hanging = [{"data": _b64(b"HANG until killed")}]
  upload = threading.Thread(
    target=lambda: answer.update(reply=_post(server, hanging, _auth(server)))
  )
  upload.start()
  for _ in range(3000):  # until its image is in a worker's hands
    if server.metric("avg_jax_serve_decoding_images") >= 1:
      break
    threading.Event().wait(0.1)
  assert server.stop() == 0  # SIGTERM: the in-flight upload is answered first
  upload.join()
  status, reply = answer["reply"]
  stopped = f"took longer than {server.image_timeout} s to decode (stopped)"
  assert (status, reply["error"]["message"]) == (400, stopped)
