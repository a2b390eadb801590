"""Work cut into fixed-size shards, shared among JAX processes, resumable.

`prepare` (records) and `embed` (feature rows) both cut each split into shards of a fixed
number of items (`data.examples_per_shard`, `encoder_train.embed_images_per_shard`). The
boundaries depend only on the split sizes and that config value, never on the number of
processes, so a run resumed with another process count finds the same shards and skips the
finished ones. Shards are numbered over all splits in order; process p of n takes shards
p, p + n, p + 2n, ... (`assigned`).

    plan({"train": 10, "val": 3}, 4) -> train 0-4, train 4-8, train 8-10, val 0-3
    assigned(that, 1, 2)           -> train 4-8, val 0-3

Synchronising the processes around them: avg_jax.processes.
"""

import dataclasses
from collections.abc import Mapping, Sequence

from avg_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Shard:
  """Items `[start, stop)` of `split` (input images for prepare, images for embed)."""

  split: str
  start: int
  stop: int

  @property
  def name(self) -> str:
    """`train-000001024-000002048`: the range is in the name, so a file written with another
    shard size is never mistaken for this shard."""
    return f"{self.split}-{self.start:09d}-{self.stop:09d}"

  def __len__(self) -> int:
    return self.stop - self.start


def plan(sizes: Mapping[str, int], per_shard: int, key: str) -> list[Shard]:
  """Every split's `[0, n)` cut into `per_shard`-item shards (the last one shorter), splits in
  the order of `sizes`. `key` names the config value in the error for a bad size."""
  if int(per_shard) < 1:
    raise UserError(f"config {key}: must be >= 1, got {per_shard}")
  return [
    Shard(split, start, min(start + per_shard, n))
    for split, n in sizes.items()
    for start in range(0, n, per_shard)
  ]


def assigned(shards: Sequence[Shard], process_index: int, process_count: int) -> list[Shard]:
  """The shards process `process_index` of `process_count` handles: every n-th from p."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return list(shards[process_index::process_count])


def describe(
  stage: str,
  split: str,
  total: int,
  skipped: int,
  written: int,
  process_index: int,
  process_count: int,
) -> str:
  """The line a process prints per split, e.g. `embed train: 3 of 5 shards already done,
  skipped; wrote 2 of 5 (process 0 of 1)`; counts are over this process's shards."""
  done = f"{skipped} of {total} shards already done, skipped; " if skipped else ""
  return (
    f"{stage} {split}: {done}wrote {written} of {total} shards "
    f"(process {process_index} of {process_count})"
  )


def report(
  stage: str, counts: Mapping[str, list], process_index: int, process_count: int
) -> dict[str, tuple]:
  """Prints `describe` for every split with shards of this process; returns
  `{split: (total, skipped, written)}` from `counts = {split: [total, skipped, written]}`."""
  for split, (total, skipped, written) in counts.items():
    if total:
      print(describe(stage, split, total, skipped, written, process_index, process_count))
  return {split: tuple(c) for split, c in counts.items()}
