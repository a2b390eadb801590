"""The HTTP surface: routes, handlers, JSON errors and per-request accounting.

    GET  /                  the search page (page/index.html)
    GET  /static/{name}     the page's script and style sheet
    GET  /healthz           200 {"status": "ok"}; 503 {"status": "draining"} after SIGTERM
    GET  /metrics           Prometheus text format
    GET  /v1/info           index size, k limits, query limits, buckets
    POST /v1/search         {"queries": [...], "k": 10} -> ranked images per query
    GET  /v1/images/{id}    the image's thumbnail (the export's gallery, or an added image's)
    POST /v1/images         add images to the live index (avg / rq exports; requests.py)
    DELETE /v1/images/{id}  remove an image from the live index

Every error is JSON `{"error": {"field": ..., "message": ...}}` with a 4xx status for what the
client sent (`field` names the offending part: `queries[2]`, `k`, `body`, `id`, `path`,
`method`) and 500 for a bug, which is logged and never stops the server.

Index changes run on the device thread, one at a time between search batches: the Retriever
writes the new live version (crash-safe, under the export's write lock), swaps its search
state whole, then the search programs are compiled again for the new tree before the change
is answered -- searches queued meanwhile wait and never see a half-changed index nor compile.
A change another process makes (`avg-jax index`) is picked up at this server's next change or
restart. Status codes: 201 added, 200 removed, 400 bad body / image, 404 unknown id, 409 id
already indexed or another writer holds the index, 500 a damaged live index on this machine.

Writes (POST / DELETE /v1/images) are refused unless the server runs with `--allow-writes`
(403 `"this server is read-only ..."`); then each needs `Authorization: Bearer <token>`
(401 otherwise, compared in constant time), and a browser's `Origin`, when sent, must be the
server's own (`scheme://Host`) or an `--allowed-origin` (403): a page on another site can
make a visitor's browser send a "simple" cross-site POST (`text/plain`, no preflight), and
the Origin header is what tells it apart. Searches stay open to every origin (the page
itself reads /v1/info and /v1/search).

Every 5xx is the server's fault: a client that hangs up before its body arrived is counted
under status "499" (as nginx does) and not logged as an error.
"""

import asyncio
import dataclasses
import hmac
import importlib.resources
import logging
import time
from collections.abc import Callable

from aiohttp import web

from avg_jax.errors import UserError
from avg_jax.inference import live_index as live_lib
from avg_jax.inference.gallery import Gallery
from avg_jax.inference.retriever import Retriever
from avg_jax.inference.terminal import safe
from avg_jax.serve import requests as req_lib
from avg_jax.serve.batcher import Batcher, Closed
from avg_jax.serve.metrics import Metrics

log = logging.getLogger("avg_jax.serve")

_PAGE_FILES = {"index.html": "text/html", "page.js": "text/javascript", "page.css": "text/css"}


@dataclasses.dataclass(frozen=True)
class WriteAccess:
  """Who may change the index: nobody (token None: read-only), else holders of the token,
  from no browser or from the server's own origin or one of `origins`."""

  token: str | None = None
  origins: frozenset = frozenset()

  def check(self, request: web.Request) -> None:
    """Raises the 403 / 401 `ApiError` for a write `request` that may not change the index."""
    if self.token is None:
      raise req_lib.ApiError(
        403,
        None,
        "this server is read-only: start it with "
        "--allow-writes and a write token to add or remove images",
      )
    origin = request.headers.get("Origin")
    if origin is not None:
      own = f"{request.scheme}://{request.host}".lower()
      if origin.lower() not in self.origins | {own}:
        raise req_lib.ApiError(
          403,
          "Origin",
          f"writes from origin {origin[:80]!r} are "
          f"refused (this server's own is {own[:80]!r}; see "
          f"--allowed-origin)",
        )
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
      given.strip().encode("utf-8", "replace"), self.token.encode()
    ):
      raise req_lib.ApiError(
        401,
        "Authorization",
        "writes need 'Authorization: Bearer <token>' with the server's write token",
      )


class ClientGone(Exception):
  """The client closed the connection before its request body arrived."""


@dataclasses.dataclass
class Service:
  """What the handlers share: one Retriever (used only through the batcher), the gallery."""

  retriever: Retriever
  gallery: Gallery | None
  batcher: Batcher
  metrics: Metrics
  limits: req_lib.Limits
  base_k: int  # the k every search with k <= base_k runs with (server.program_k)
  rewarm: Callable[[], None] | None = None  # compiles the search for a changed index
  max_add_images: int = 64
  uploads: object = None  # uploads.Uploads when writes are allowed
  writes: WriteAccess = WriteAccess()
  draining: bool = False
  active_requests: int = 0

  def program_k(self, k: int) -> int:
    return max(k, self.base_k)

  async def change(self, fn: Callable[[], object]):
    """Runs an index change, then the re-compile, on the device thread; -> fn's result."""

    def run():
      # Compiles of the change itself (image encoder, tokenizer, tree) and of the re-warm are
      # not a request's: the metric that must stay 0 counts those only.
      self.metrics.mark_cold()
      try:
        result = fn()
        if self.rewarm is not None:
          self.rewarm()
        return result
      finally:
        self.metrics.mark_warm()

    try:
      result = await asyncio.wrap_future(self.batcher.run_on_device(run))
    except live_lib.LiveIndexDamaged as e:
      # The index on this machine is damaged or was edited: the operator's to fix.
      # The client learns what happened, not this machine's paths (they are in the log).
      log.error("serve: the live index is damaged: %s", e)
      raise req_lib.ApiError(
        500,
        None,
        "the server's live index is damaged or was changed "
        "by hand; nothing was changed (the server's log says which "
        "file; its operator must restore it)",
      ) from e
    except UserError as e:
      raise _change_error(str(e)) from e
    self.metrics.index_images.set(len(self.retriever.image_ids))
    self.metrics.index_changes.inc()
    return result

  def captions(self, image_id: int) -> list[str]:
    if self.gallery is not None and self.gallery.captions(image_id):
      return self.gallery.captions(image_id)
    return self.retriever.added_captions(image_id)

  def thumbnail(self, image_id: int) -> tuple[bytes, str] | None:
    thumb = self.gallery.thumbnail(image_id) if self.gallery is not None else None
    return thumb if thumb is not None else self.retriever.live_thumbnail(image_id)


def _change_error(message: str) -> req_lib.ApiError:
  """The HTTP form of a `UserError` from `Retriever.add` / `remove`."""
  if "another process is changing this index" in message:
    return req_lib.ApiError(409, None, message)
  if "is already indexed" in message or "repeats among" in message:
    return req_lib.ApiError(409, "id", message)
  if "is not in the index" in message:
    return req_lib.ApiError(404, "id", message)
  if "would be empty" in message:
    return req_lib.ApiError(409, "id", message)
  return req_lib.ApiError(400, "images", message)


SERVICE = web.AppKey("service", Service)


def _error(status: int, field: str | None, message: str) -> web.Response:
  return web.json_response(req_lib.ApiError(status, field, message).body(), status=status)


_HTTP_FIELDS = {404: "path", 405: "method", 413: "body"}


@web.middleware
async def _account(request: web.Request, handler) -> web.StreamResponse:
  """Counts and times every request, answers errors as JSON, closes connections on drain."""
  service: Service = request.app[SERVICE]
  route = request.match_info.route.resource
  route_name = route.canonical if route is not None else "unmatched"
  service.active_requests += 1
  start = time.perf_counter()
  response, status = None, "cancelled"
  try:
    try:
      response = await _answer(request, handler)
    except ClientGone:
      # Nobody reads an answer; the connection is closed. Not a server error.
      status = "499"
      response = web.Response(status=499)
      response.force_close()
      return response
    status = str(response.status)
    if service.draining:
      response.force_close()  # the client reconnects elsewhere; we are stopping
    return response
  finally:
    service.active_requests -= 1
    service.metrics.requests.labels(route_name, status).inc()
    service.metrics.latency.labels(route_name).observe(time.perf_counter() - start)


async def _answer(request: web.Request, handler) -> web.StreamResponse:
  try:
    return await handler(request)
  except req_lib.ApiError as e:
    return web.json_response(e.body(), status=e.status)
  except web.HTTPException as e:
    if e.status < 400:
      raise
    message = e.reason
    if e.status == 413:
      message = f"request body over the limit of {request.client_max_size} bytes"
    response = _error(e.status, _HTTP_FIELDS.get(e.status), message)
    if "Allow" in e.headers:
      response.headers["Allow"] = e.headers["Allow"]
    return response
  except Closed as e:
    return _error(503, None, str(e))
  except ClientGone:
    raise
  except Exception:  # noqa: BLE001 - a bug answers 500; the server keeps serving
    # The path is the client's text: escaped, so a log read on a terminal stays inert.
    log.exception("unhandled error in %s %s", request.method, safe(request.path[:200]))
    return _error(500, None, "internal error (logged by the server)")


async def read_body(request: web.Request) -> bytes:
  """The request body within the size limit (413 on the Content-Length header alone);
  `ClientGone` when the client hangs up before sending it all."""
  if (request.content_length or 0) > request.client_max_size:
    raise req_lib.ApiError(
      413, "body", f"request body over the limit of {request.client_max_size} bytes"
    )
  try:
    return await request.read()
  except ConnectionResetError as e:  # aiohttp's "Connection lost" (and its subclasses)
    raise ClientGone() from e


def _page_file(name: str) -> bytes:
  return importlib.resources.files("avg_jax.serve").joinpath("page", name).read_bytes()


def build_app(service: Service, max_body_bytes: int) -> web.Application:
  app = web.Application(middlewares=[_account], client_max_size=max_body_bytes)
  app[SERVICE] = service
  pages = {name: _page_file(name) for name in _PAGE_FILES}  # read once, at start

  async def index(request):
    return web.Response(body=pages["index.html"], content_type="text/html", charset="utf-8")

  async def static(request):
    name = request.match_info["name"]
    if name not in pages or name == "index.html":
      raise req_lib.ApiError(404, "path", f"no static file {name[:60]!r}")
    return web.Response(body=pages[name], content_type=_PAGE_FILES[name], charset="utf-8")

  async def healthz(request):
    if service.draining:
      return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ok"})

  async def metrics(request):
    body, content_type = service.metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})

  async def info(request):
    r = service.retriever
    return web.json_response(
      {
        "num_images": int(len(r.image_ids)),
        "default_k": service.limits.default_k,
        "max_k": service.limits.max_k,
        "max_queries": service.limits.max_queries,
        "max_query_chars": service.limits.max_query_chars,
        "batch_buckets": list(r.buckets),
        "thumbnails": service.gallery is not None,
        "writes": ("token" if service.writes.token is not None else "read-only"),
        "scheme": r.manifest.get("scheme"),
        "source_stage": r.manifest.get("source_stage"),
      }
    )

  async def search(request):
    start = time.perf_counter()
    document = req_lib.parse_json(await read_body(request))
    query = req_lib.parse_search(document, service.limits, service.retriever.validate)
    service.metrics.in_flight.inc()
    try:
      ids, scores = await service.batcher.submit(query.queries, service.program_k(query.k))
    finally:
      service.metrics.in_flight.dec()
    service.metrics.queries.inc(len(query.queries))
    results = [
      {"query": q, "items": _items(service, ids[i, : query.k], scores[i, : query.k])}
      for i, q in enumerate(query.queries)
    ]
    return web.json_response(
      {"k": query.k, "results": results, "took_ms": round(1000 * (time.perf_counter() - start), 3)}
    )

  async def image(request):
    image_id = req_lib.parse_image_id(request.match_info["id"])
    known = image_id in service.retriever.image_ids
    thumb = service.thumbnail(image_id) if known else None
    if thumb is None:
      message = (
        f"image {image_id} has no thumbnail in this export"
        if known
        else f"no image {image_id} in the index"
      )
      raise req_lib.ApiError(404, "id", message)
    data, content_type = thumb
    return web.Response(
      body=data, content_type=content_type, headers={"Cache-Control": "public, max-age=3600"}
    )

  app.router.add_get("/", index)
  app.router.add_get("/static/{name}", static)
  app.router.add_get("/healthz", healthz)
  app.router.add_get("/metrics", metrics)
  app.router.add_get("/v1/info", info)
  app.router.add_post("/v1/search", search)

  async def add_images(request):
    service.writes.check(request)  # before the body is read
    if service.draining:
      raise req_lib.ApiError(503, None, "the server is shutting down")
    add = req_lib.parse_add(req_lib.parse_json(await read_body(request)), service.max_add_images)
    # Decoded in the upload workers (time and pixel budgets), off this event loop.
    service.metrics.decoding.inc(len(add.images))
    try:
      pixels = await service.uploads.decode(add.images)
    finally:
      service.metrics.decoding.dec(len(add.images))
    ids = await service.change(
      lambda: service.retriever.add(
        pixels, ids=add.ids, captions=add.captions, file_names=add.file_names
      )
    )
    return web.json_response(
      {
        "added": [int(i) for i in ids],
        "num_images": int(len(service.retriever.image_ids)),
        "version": int(service.retriever.state.live.version),
      },
      status=201,
    )

  async def remove_image(request):
    service.writes.check(request)
    if service.draining:
      raise req_lib.ApiError(503, None, "the server is shutting down")
    image_id = req_lib.parse_image_id(request.match_info["id"])
    await service.change(lambda: service.retriever.remove([image_id]))
    return web.json_response(
      {
        "removed": image_id,
        "num_images": int(len(service.retriever.image_ids)),
        "version": int(service.retriever.state.live.version),
      }
    )

  app.router.add_get("/v1/images/{id}", image)
  # Removing needs only the index; adding needs the image encoder and tokenizer (avg / rq).
  app.router.add_delete("/v1/images/{id}", remove_image)
  if service.retriever.manifest.get("live") is not None:
    # (The upload workers exist whenever writes are allowed: `writes.check` refuses first.)
    app.router.add_post("/v1/images", add_images)
  return app


def _items(service: Service, ids, scores) -> list[dict]:
  gallery = service.gallery
  items = []
  for rank, (image_id, score) in enumerate(zip(ids.tolist(), scores.tolist())):
    if image_id < 0:  # fewer than k images reachable
      continue
    has_thumb = (
      gallery is not None and gallery.has_thumbnail(image_id)
    ) or service.retriever.live_thumbnail(image_id) is not None
    items.append(
      {
        "rank": rank + 1,
        "image_id": image_id,
        "score": score,
        "file_name": service.retriever.file_name(image_id),
        "captions": service.captions(image_id),
        "image_url": f"/v1/images/{image_id}" if has_thumb else None,
      }
    )
  return items
