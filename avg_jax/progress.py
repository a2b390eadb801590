"""Progress bars for long work (tqdm on stderr; quiet when AVG_JAX_NO_PROGRESS is set)."""

import os
import sys
from typing import Iterable, Optional, TypeVar

import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], *, total: Optional[int] = None, desc: str = "",
             unit: str = "it") -> Iterable[T]:
  """Wraps `iterable` in a progress bar on stderr."""
  disable = bool(os.environ.get("AVG_JAX_NO_PROGRESS"))
  return tqdm.tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr,
                   disable=disable, dynamic_ncols=True, leave=False)
