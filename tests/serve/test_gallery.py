"""The export's gallery (thumbnails + captions) and the service on an export without one."""

import asyncio
import io
import json
import os
import shutil

import pytest
from PIL import Image

from avg_jax.errors import UserError
from avg_jax.inference import gallery as gallery_lib


def _png(w, h, color=(200, 30, 40)) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", (w, h), color).save(buffer, format="PNG")
  return buffer.getvalue()


def test_write_and_read_round_trip(tmp_path):
  small, large = _png(32, 20), _png(900, 300)
  entries = [
    gallery_lib.Entry(7, "a.png", ["a red thing", "red"], small),
    gallery_lib.Entry(9, "b.png", ["a wide one"], large),
    gallery_lib.Entry(11, "c.png", ["broken"], b"not an image"),
    gallery_lib.Entry(12, "", [], b""),
  ]
  gallery_lib.write(str(tmp_path), iter(entries), thumbnail_size=128)
  g = gallery_lib.read(str(tmp_path))
  assert g.thumbnail(7) == (small, "image/png")  # small enough: the original bytes
  data, kind = g.thumbnail(9)
  assert kind == "image/jpeg"
  with Image.open(io.BytesIO(data)) as im:
    assert im.size == (128, 43)  # longer side shrunk to 128, aspect kept
  assert g.thumbnail(11) is None and g.thumbnail(12) is None and g.thumbnail(99) is None
  assert g.has_thumbnail(7) and not g.has_thumbnail(11) and not g.has_thumbnail(99)
  assert g.captions(7) == ["a red thing", "red"] and g.captions(99) == []
  assert 12 in g and 99 not in g


def test_missing_gallery_is_none_and_damaged_is_a_user_error(tmp_path):
  assert gallery_lib.read(str(tmp_path)) is None
  gallery_lib.write(str(tmp_path), [gallery_lib.Entry(1, "a", [], _png(8, 8))], 64)
  directory = tmp_path / gallery_lib.DIRECTORY
  (directory / gallery_lib.THUMBNAILS).write_bytes(b"\x89PN")  # truncated
  with pytest.raises(UserError, match="holds 3 bytes"):
    gallery_lib.read(str(tmp_path))
  (directory / gallery_lib.INDEX).write_text("{not json")
  with pytest.raises(UserError, match="unreadable gallery"):
    gallery_lib.read(str(tmp_path))


def test_export_gallery_has_every_indexed_image(serve_export, retriever):
  g = gallery_lib.read(str(serve_export))
  index = json.loads((serve_export / "gallery" / "index.json").read_text())
  assert [i["image_id"] for i in index["images"]] == retriever.image_ids.tolist()
  for image_id in retriever.image_ids.tolist():
    data, kind = g.thumbnail(image_id)
    assert kind == "image/png"
    with Image.open(io.BytesIO(data)) as im:
      assert im.size == (32, 32)  # the tiny config's images, kept as they are
    assert len(g.captions(image_id)) == 5
  assert index["images"][0]["file_name"] == retriever.file_name(index["images"][0]["image_id"])


def test_service_on_an_export_without_gallery(serve_export, tmp_path):
  # An export written before galleries existed: it loads and serves results without pictures.
  from aiohttp.test_utils import TestClient, TestServer

  from avg_jax.inference.retriever import Retriever
  from avg_jax.serve import requests as req_lib
  from avg_jax.serve.batcher import Batcher
  from avg_jax.serve.metrics import Metrics
  from avg_jax.serve.routes import Service, build_app

  old = tmp_path / "export"
  shutil.copytree(serve_export, old)
  shutil.rmtree(old / gallery_lib.DIRECTORY)
  os.remove(old / "checksums.json")  # an export from before galleries had no checksums either
  retriever = Retriever.load(str(old))
  assert gallery_lib.read(str(old)) is None

  async def scenario():
    metrics = Metrics(retriever.buckets)
    batcher = Batcher(retriever.search, max_batch=32, wait_s=0.0, metrics=metrics)
    service = Service(
      retriever=retriever,
      gallery=None,
      batcher=batcher,
      metrics=metrics,
      limits=req_lib.Limits(max_k=5, default_k=5, max_queries=8, max_query_chars=1000),
      base_k=5,
    )
    batcher.start()
    async with TestClient(TestServer(build_app(service, 4096))) as client:
      r = await client.post("/v1/search", json={"queries": ["a red circle"], "k": 3})
      body = await r.json()
      image = await client.get(f"/v1/images/{int(retriever.image_ids[0])}")
      info = await (await client.get("/v1/info")).json()
      result = r.status, body, image.status, await image.json(), info
    await batcher.close()
    return result

  status, body, image_status, image_error, info = asyncio.run(scenario())
  assert status == 200
  ids, _ = retriever.search(["a red circle"], k=3)
  items = body["results"][0]["items"]
  assert [i["image_id"] for i in items] == ids[0].tolist()
  assert all(i["image_url"] is None and i["captions"] == [] and i["file_name"] for i in items)
  assert image_status == 404 and "has no thumbnail" in image_error["error"]["message"]
  assert info["thumbnails"] is False
