"""The service's live index: POST /v1/images adds, DELETE /v1/images/{id} removes (with the
write token, from the server's own origin); results equal a Retriever that loads the same
export afterwards; bad requests get their 4xx naming the field; nothing a request does
compiles (the change re-compiles before it answers)."""

import base64
import json

import numpy as np

from avg_jax.data import dataset
from avg_jax.inference.retriever import Retriever


def _auth(server) -> dict:
  # What the search page's origin would send, with the token.
  return {"Authorization": f"Bearer {server.token}", "Origin": server.url}


def _post_images(server, images):
  status, _, body = server.request(
    "POST",
    "/v1/images",
    json.dumps({"images": images}).encode(),
    {"Content-Type": "application/json", **_auth(server)},
  )
  return status, json.loads(body)


def test_add_and_remove_over_http(writable_server, pipeline_workdir):
  server, model = writable_server, writable_server.model
  changes = server.metric("avg_jax_serve_index_changes_total")
  source = dataset.image_source(str(pipeline_workdir), "test", decode_image=False)
  record = source[0]
  original = int(record["image_id"])
  caption = record["captions"][0]
  data = base64.b64encode(bytes(record["image"])).decode()
  new_id = 20_000_000

  # Bad requests first: nothing changes, each names its field.
  for images, status, field in (
    ([{"data": "@@not base64@@"}], 400, "images[0].data"),
    ([{"data": base64.b64encode(b"not an image").decode()}], 400, "images[0].data"),
    ([{"data": data, "id": "7"}], 400, "images[0].id"),
    ([{"data": data, "colour": 1}], 400, "images[0].colour"),
    ([{"data": data, "id": original}], 409, "id"),  # already indexed
    ([], 400, "images"),
  ):
    got, body = _post_images(server, images)
    assert (got, body["error"]["field"]) == (status, field), body
  status, _, body = server.request("DELETE", "/v1/images/987654321", headers=_auth(server))
  assert status == 404 and json.loads(body)["error"]["field"] == "id"

  # Add a copy of an indexed image under a new id (its captions given).
  status, body = _post_images(
    server, [{"data": data, "id": new_id, "captions": ["a copy"], "file_name": "copy.png"}]
  )
  assert status == 201 and body["added"] == [new_id], body
  status, response = server.search([caption], k=5)
  assert status == 200
  want_ids, want_scores = Retriever.load(str(model)).search([caption], k=5)
  got = response["results"][0]["items"]
  assert [it["image_id"] for it in got] == [int(i) for i in want_ids[0] if i >= 0]
  np.testing.assert_allclose(
    [it["score"] for it in got], want_scores[0][want_ids[0] >= 0], atol=1e-5
  )
  copy = [it for it in got if it["image_id"] == new_id]
  if original in [it["image_id"] for it in got]:  # same codes, same score: found together
    assert copy and copy[0]["captions"] == ["a copy"] and copy[0]["file_name"] == "copy.png"
  status, headers, thumb = server.request("GET", f"/v1/images/{new_id}")
  assert status == 200 and thumb.startswith(b"\x89PNG")

  # Remove the original: gone from every result, and from a reloaded Retriever.
  status, _, body = server.request("DELETE", f"/v1/images/{original}", headers=_auth(server))
  assert status == 200 and json.loads(body)["removed"] == original
  status, response = server.search([caption, "a red circle", "a small blue square"], k=5)
  ids = [it["image_id"] for r in response["results"] for it in r["items"]]
  assert original not in ids
  assert original not in Retriever.load(str(model)).image_ids
  status, _, _ = server.request("GET", f"/v1/images/{original}")
  assert status == 404
  assert server.metric("avg_jax_serve_xla_compiles_after_warmup_total") == 0
  assert server.metric("avg_jax_serve_index_changes_total") == changes + 2
  status, _, body = server.request("GET", "/healthz")
  assert status == 200
