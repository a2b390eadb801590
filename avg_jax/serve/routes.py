"""The HTTP surface: routes, handlers, JSON errors and per-request accounting.

    GET  /                  the search page (page/index.html)
    GET  /static/{name}     the page's script and style sheet
    GET  /healthz           200 {"status": "ok"}; 503 {"status": "draining"} after SIGTERM
    GET  /metrics           Prometheus text format
    GET  /v1/info           index size, k limits, query limits, buckets
    POST /v1/search         {"queries": [...], "k": 10} -> ranked images per query
    GET  /v1/images/{id}    the image's thumbnail from the export's gallery

Every error is JSON `{"error": {"field": ..., "message": ...}}` with a 4xx status for what the
client sent (`field` names the offending part: `queries[2]`, `k`, `body`, `id`, `path`,
`method`) and 500 for a bug, which is logged and never stops the server.

The live index (POST /v1/images, DELETE /v1/images/{id}) registers beside `GET
/v1/images/{id}` in `build_app` once the Retriever can add and remove images; handlers reach
images only through `Service`, which is where that index will plug in.
"""

import dataclasses
import importlib.resources
import logging
import time

from aiohttp import web

from avg_jax.export.gallery import Gallery
from avg_jax.export.serving import Retriever
from avg_jax.serve import requests as req_lib
from avg_jax.serve.batcher import Batcher, Closed
from avg_jax.serve.metrics import Metrics

log = logging.getLogger("avg_jax.serve")

_PAGE_FILES = {"index.html": "text/html", "page.js": "text/javascript",
               "page.css": "text/css"}


@dataclasses.dataclass
class Service:
  """What the handlers share: one Retriever (used only through the batcher), the gallery."""
  retriever: Retriever
  gallery: Gallery | None
  batcher: Batcher
  metrics: Metrics
  limits: req_lib.Limits
  base_k: int             # the k every search with k <= base_k runs with (server.program_k)
  draining: bool = False
  active_requests: int = 0

  def program_k(self, k: int) -> int:
    return max(k, self.base_k)


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
  response = None
  try:
    response = await _answer(request, handler)
    if service.draining:
      response.force_close()  # the client reconnects elsewhere; we are stopping
    return response
  finally:
    service.active_requests -= 1
    status = str(response.status) if response is not None else "cancelled"
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
  except Exception:  # noqa: BLE001 - a bug answers 500; the server keeps serving
    log.exception("unhandled error in %s %s", request.method, request.path)
    return _error(500, None, "internal error (logged by the server)")


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
    return web.json_response({
        "num_images": int(len(r.image_ids)), "default_k": service.limits.default_k,
        "max_k": service.limits.max_k, "max_queries": service.limits.max_queries,
        "max_query_chars": service.limits.max_query_chars, "batch_buckets": list(r.buckets),
        "thumbnails": service.gallery is not None,
        "scheme": r.manifest.get("scheme"), "source_stage": r.manifest.get("source_stage")})

  async def search(request):
    start = time.perf_counter()
    if (request.content_length or 0) > request.client_max_size:
      # Refused on the header alone: the body is never read.
      raise req_lib.ApiError(413, "body", f"request body over the limit of "
                             f"{request.client_max_size} bytes")
    document = req_lib.parse_json(await request.read())
    query = req_lib.parse_search(document, service.limits, service.retriever.validate)
    service.metrics.in_flight.inc()
    try:
      ids, scores = await service.batcher.submit(query.queries, service.program_k(query.k))
    finally:
      service.metrics.in_flight.dec()
    service.metrics.queries.inc(len(query.queries))
    results = [{"query": q, "items": _items(service, ids[i, :query.k], scores[i, :query.k])}
               for i, q in enumerate(query.queries)]
    return web.json_response({"k": query.k, "results": results,
                              "took_ms": round(1000 * (time.perf_counter() - start), 3)})

  async def image(request):
    image_id = req_lib.parse_image_id(request.match_info["id"])
    known = image_id in service.retriever.image_ids
    thumb = service.gallery.thumbnail(image_id) if service.gallery is not None else None
    if thumb is None:
      message = (f"image {image_id} has no thumbnail in this export" if known
                 else f"no image {image_id} in the index")
      raise req_lib.ApiError(404, "id", message)
    data, content_type = thumb
    return web.Response(body=data, content_type=content_type,
                        headers={"Cache-Control": "public, max-age=3600"})

  app.router.add_get("/", index)
  app.router.add_get("/static/{name}", static)
  app.router.add_get("/healthz", healthz)
  app.router.add_get("/metrics", metrics)
  app.router.add_get("/v1/info", info)
  app.router.add_post("/v1/search", search)
  app.router.add_get("/v1/images/{id}", image)
  return app


def _items(service: Service, ids, scores) -> list[dict]:
  gallery = service.gallery
  items = []
  for rank, (image_id, score) in enumerate(zip(ids.tolist(), scores.tolist())):
    if image_id < 0:  # fewer than k images reachable
      continue
    has_thumb = gallery is not None and gallery.has_thumbnail(image_id)
    items.append({
        "rank": rank + 1, "image_id": image_id, "score": score,
        "file_name": service.retriever.file_name(image_id),
        "captions": gallery.captions(image_id) if gallery is not None else [],
        "image_url": f"/v1/images/{image_id}" if has_thumb else None})
  return items
