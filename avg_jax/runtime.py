"""Process-wide settings every avg-jax process applies at start (the CLI, `Retriever.load`).

They belong to the process, not to a computation: benchmarks measure under the same
settings, so the speed they report is the speed users get.
"""


def prefer_heap_allocations() -> bool:
  """Stops glibc from serving large buffers with fresh mmap()s (Linux; idempotent).

  XLA:CPU allocates every intermediate of every call anew; buffers above glibc's mmap
  threshold (at most 32 MB by default) come from mmap and are page-faulted in on first touch
  each call. For the `[rows, 33 152]` float32 full-vocabulary logits of a search step that
  cost ~10x the arithmetic (an elementwise op over it took 29 ms instead of 2 ms), 25-40 % of
  a small model's search. Raising the threshold keeps such buffers on the heap, where freed
  pages are reused. Returns whether the setting took (False off glibc).
  """
  try:
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  m_trim_threshold, m_mmap_threshold = -1, -3
  ok = libc.mallopt(m_mmap_threshold, 2**31 - 1) == 1
  return ok and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
