"""Prometheus metrics of one server process (its own registry, text format on /metrics).

XLA compiles are counted with a `jax.monitoring` listener on the backend-compile event, so a
compile anywhere in the process (not only in the search) shows; `mark_warm()` fixes the count
at the end of warm-up and `compiles_after_warmup` is what a healthy server keeps at 0.
"""

import threading

import jax
import prometheus_client as prom

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
  def __init__(self, batch_buckets: tuple[int, ...]):
    prom.disable_created_metrics()  # no `_created` series: they double the exposition's size
    self.registry = prom.CollectorRegistry(auto_describe=True)
    r = self.registry
    self.requests = prom.Counter(
      "avg_jax_serve_requests",
      "HTTP requests answered, by route and status",
      ["route", "status"],
      registry=r,
    )
    self.latency = prom.Histogram(
      "avg_jax_serve_request_seconds",
      "HTTP request latency, by route",
      ["route"],
      buckets=_LATENCY_BUCKETS,
      registry=r,
    )
    self.in_flight = prom.Gauge(
      "avg_jax_serve_in_flight_requests", "search requests being answered", registry=r
    )
    self.queries = prom.Counter(
      "avg_jax_serve_queries", "queries searched (a request may hold several)", registry=r
    )
    self.queue_depth = prom.Gauge(
      "avg_jax_serve_queued_queries", "queries waiting for the device", registry=r
    )
    self.batch_size = prom.Histogram(
      "avg_jax_serve_batch_size",
      "queries per device call (before padding to a bucket)",
      buckets=tuple(range(1, max(batch_buckets) + 1)),
      registry=r,
    )
    self.device_seconds = prom.Histogram(
      "avg_jax_serve_device_seconds",
      "wall time of one search call on the device thread",
      buckets=_LATENCY_BUCKETS,
      registry=r,
    )
    self.compiles = prom.Counter(
      "avg_jax_serve_xla_compiles", "XLA backend compiles in this process", registry=r
    )
    self.compiles_after_warmup = prom.Counter(
      "avg_jax_serve_xla_compiles_after_warmup",
      "XLA backend compiles after the warm-up finished (should stay 0)",
      registry=r,
    )
    self.warmup_seconds = prom.Gauge(
      "avg_jax_serve_warmup_seconds", "time spent compiling every bucket at start", registry=r
    )
    self.index_images = prom.Gauge(
      "avg_jax_serve_index_images", "images in the served index", registry=r
    )
    self.index_changes = prom.Counter(
      "avg_jax_serve_index_changes", "live index changes (adds, removals) applied", registry=r
    )
    self.rewarm_seconds = prom.Histogram(
      "avg_jax_serve_rewarm_seconds",
      "compiling the search again after an index change",
      buckets=_LATENCY_BUCKETS,
      registry=r,
    )
    self.decoding = prom.Gauge(
      "avg_jax_serve_decoding_images", "uploaded images in the image workers' hands", registry=r
    )
    self.draining = prom.Gauge(
      "avg_jax_serve_draining", "1 after SIGTERM while in-flight requests finish", registry=r
    )
    self._lock = threading.Lock()
    self._warm = False
    self._compile_count = 0

  def listen_for_compiles(self) -> None:
    """Registers the compile listener (call once, before the first compile to count)."""
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, duration_secs: float, **_: str | int) -> None:
    if event != _BACKEND_COMPILE_EVENT:
      return
    with self._lock:
      self._compile_count += 1
      self.compiles.inc()
      if self._warm:
        self.compiles_after_warmup.inc()

  def mark_warm(self) -> None:
    with self._lock:
      self._warm = True

  def mark_cold(self) -> None:
    """Compiles from now until `mark_warm` are a warm-up's (after an index change), not a
    request's."""
    with self._lock:
      self._warm = False

  @property
  def compile_count(self) -> int:
    with self._lock:
      return self._compile_count

  def render(self) -> tuple[bytes, str]:
    """(body, content type) of the Prometheus text exposition."""
    return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST
