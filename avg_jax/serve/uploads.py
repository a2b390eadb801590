"""Images uploaded to `POST /v1/images`, decoded off the event loop in worker processes.

    uploads = Uploads(image_size=64, workers=2, timeout_s=10, max_pixels=40_000_000)
    pixels = await uploads.decode(images)     # uint8 [64, 64, 3] each, or ApiError 400

An upload is untrusted bytes: PIL and resvg run in `image_worker` processes (never on the
event loop, never in the server process), one image per worker at a time, each with a time
budget (the worker is killed past it), a pixel budget checked on the header before any pixel
is decoded, an address-space cap, and a lower CPU priority than the server's searches. So a
slow or hostile image costs one worker for at most `timeout_s`: /healthz and searches are
answered meanwhile, and SIGTERM still drains. Only PNG, JPEG, WebP and SVG are read
(`images.UPLOAD_FORMATS`). The worker returns what `prepare` makes of the image (resized
and centre-cropped to the export's `data.image_size`), which `Retriever.add` takes as
pixels. Reasons name no server path: the worker reads bytes, never files.
"""

import asyncio
import concurrent.futures

import numpy as np

from avg_jax.data import image_worker
from avg_jax.data import images as images_lib
from avg_jax.serve.requests import ApiError

# Address space of one worker beyond what its pixel budget needs (interpreter, numpy, PIL,
# resvg, a decoded frame and its RGB copy).
_BASE_MEMORY = 1 << 30


class Uploads:
  """The service's image workers (`workers` processes and as many waiting threads)."""

  def __init__(
    self,
    *,
    image_size: int,
    workers: int,
    timeout_s: float,
    max_pixels: int,
    env: dict | None = None,
  ):
    self.params = {
      "formats": list(images_lib.UPLOAD_FORMATS),
      "max_pixels": int(max_pixels),
      "size": int(image_size),
    }
    self.timeout_s = float(timeout_s)
    # The decoded frame, its RGBA form, the white background, the composite and the RGB copy:
    # ~20 bytes per pixel of the budget.
    memory = _BASE_MEMORY + 24 * int(max_pixels)
    self._pool = image_worker.WorkerPool(workers, memory_bytes=memory, env=env)
    self._threads = concurrent.futures.ThreadPoolExecutor(
      max_workers=len(self._pool.workers), thread_name_prefix="avg-jax-upload"
    )

  def start(self) -> None:
    self._pool.start()

  async def decode(self, images: list[bytes]) -> list[np.ndarray]:
    """Every image's pixels (in parallel across the workers); the first bad one (by
    position) is an `ApiError` 400 naming `images[i].data` with the reason."""
    loop = asyncio.get_running_loop()
    futures = [loop.run_in_executor(self._threads, self._one, data) for data in images]
    results = await asyncio.gather(*futures)
    pixels = []
    for i, result in enumerate(results):
      if isinstance(result, str):
        raise ApiError(400, f"images[{i}].data", result)
      pixels.append(result)
    return pixels

  def _one(self, data: bytes) -> np.ndarray | str:
    try:
      pixels = self._pool.run(self.params, data, self.timeout_s)
    except images_lib.ImageProblem as e:
      return str(e)
    assert pixels is not None  # params["size"] > 0: resized, never a check alone
    return pixels

  def close(self) -> None:
    self._pool.close()
    self._threads.shutdown(wait=False, cancel_futures=True)
