"""grain batch iterators: checkpoint/restore, sharding by process, epochs, batching."""

import grain
import numpy as np
import pytest
from absl import flags

from avg_jax.data import dataset, pipeline


def _assert_same_batch(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _images(workdir, **kw):
  args = dict(
    shuffle=True, seed=7, num_epochs=None, drop_remainder=True, process_index=0, process_count=1
  )
  args.update(kw)
  return pipeline.batch_iterator(dataset.image_source(workdir, "val"), 6, **args)


@pytest.mark.parametrize("consumed", [2, 9])  # 40 val images / 6: batch 9 is in epoch 2
def test_restored_state_gives_the_same_next_batch(prepared_workdir, consumed):
  it = _images(prepared_workdir)
  for _ in range(consumed):
    next(it)
  state = it.get_state()
  expected = next(it)
  following = next(it)
  fresh = _images(prepared_workdir)
  fresh.set_state(state)
  _assert_same_batch(next(fresh), expected)
  _assert_same_batch(next(fresh), following)
  # And a different position gives a different batch (the check can fail).
  other = _images(prepared_workdir)
  assert not np.array_equal(next(other)["image_id"], expected["image_id"])


def test_worker_processes_restore_state_and_need_no_flag_setup(prepared_workdir):
  flags.FLAGS.unparse_flags()  # as in a plain script: nobody ran absl.app
  it = _images(prepared_workdir, worker_count=1)
  try:
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    expected = next(it)
  finally:
    it.close()
  reference = _images(prepared_workdir)  # in-process: the same batches
  for batch in first:
    _assert_same_batch(next(reference), batch)
  fresh = _images(prepared_workdir, worker_count=1)
  try:
    fresh.set_state(state)
    _assert_same_batch(next(fresh), expected)
  finally:
    fresh.close()


def test_image_batches_follow_the_contract(prepared_workdir):
  batch = next(_images(prepared_workdir, shuffle=False, num_epochs=1))
  assert batch["image"].shape == (6, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert batch["image_id"].dtype == np.int64
  assert batch["captions"].shape == (6, 5) and batch["captions"].dtype.kind == "U"
  source = dataset.image_source(prepared_workdir, "val")
  np.testing.assert_array_equal(batch["image"][3], source[3]["image"])
  assert list(batch["captions"][3]) == source[3]["captions"]


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_shard_by_process_splits_disjointly(drop_remainder):
  n, count = 23, 3
  seen = []
  for index in range(count):
    it = pipeline.batch_iterator(
      grain.MapDataset.range(n),
      2,
      shuffle=True,
      seed=1,
      num_epochs=1,
      drop_remainder=drop_remainder,
      process_index=index,
      process_count=count,
    )
    seen.append([int(x) for batch in it for x in batch])
  sets = [set(s) for s in seen]
  assert all(len(s) == len(items) for s, items in zip(sets, seen))
  for i in range(count):
    for j in range(i + 1, count):
      assert not sets[i] & sets[j]
  union = set().union(*sets)
  if drop_remainder:
    # 21 elements split 7/7/7, batches of 2 -> 6 per process; all hosts stay in step.
    assert [len(s) for s in seen] == [6, 6, 6] and union <= set(range(21))
  else:
    assert union == set(range(n))
    assert sorted(len(s) for s in seen) == [7, 8, 8]


def test_epochs_are_reshuffled_and_complete():
  it = pipeline.batch_iterator(
    grain.MapDataset.range(10),
    5,
    shuffle=True,
    seed=4,
    num_epochs=2,
    drop_remainder=False,
    shard_by_process=False,
  )
  values = [int(x) for batch in it for x in batch]
  assert len(values) == 20
  first, second = values[:10], values[10:]
  assert sorted(first) == sorted(second) == list(range(10))
  assert first != second and first != list(range(10))
  unshuffled = pipeline.batch_iterator(
    grain.MapDataset.range(7),
    3,
    shuffle=False,
    seed=0,
    num_epochs=1,
    drop_remainder=False,
    shard_by_process=False,
  )
  assert [b.tolist() for b in unshuffled] == [[0, 1, 2], [3, 4, 5], [6]]


def _double(x):
  return {"x": x * 2}


def _add_sum(batch):
  return {**batch, "sum": batch["x"].sum()}


def test_map_functions_and_stack():
  it = pipeline.batch_iterator(
    list(range(6)),
    3,
    shuffle=False,
    seed=0,
    num_epochs=1,
    drop_remainder=True,
    shard_by_process=False,
    map_fn=_double,
    batch_map_fn=_add_sum,
  )
  batches = list(it)
  assert [b["x"].tolist() for b in batches] == [[0, 2, 4], [6, 8, 10]]
  assert [int(b["sum"]) for b in batches] == [6, 24]
  stacked = pipeline.stack(
    [
      {"a": np.int64(1), "t": "x", "l": ["p", "q"], "n": (np.zeros(2), 1.5)},
      {"a": np.int64(2), "t": "yy", "l": ["r", "s"], "n": (np.ones(2), 2.5)},
    ]
  )
  np.testing.assert_array_equal(stacked["a"], [1, 2])
  assert stacked["t"].tolist() == ["x", "yy"]
  assert stacked["l"].shape == (2, 2) and stacked["l"][1, 0] == "r"
  np.testing.assert_array_equal(stacked["n"][0], [[0, 0], [1, 1]])
  np.testing.assert_array_equal(stacked["n"][1], [1.5, 2.5])
  raw = pipeline.stack([b"\x89PNG\x00", b"ab"])  # trailing NUL bytes survive
  assert raw.dtype == object and raw.tolist() == [b"\x89PNG\x00", b"ab"]


def test_from_config_uses_the_loader_section(tiny_config):
  config = tiny_config(
    "loader.read_threads=2", "loader.prefetch_buffer_size=3", "loader.shuffle_seed=11"
  )
  batches = pipeline.from_config(
    list(range(8)),
    4,
    config.loader,
    shuffle=True,
    num_epochs=1,
    drop_remainder=True,
    shard_by_process=False,
  )
  expected = pipeline.batch_iterator(
    list(range(8)),
    4,
    shuffle=True,
    seed=11,
    num_epochs=1,
    drop_remainder=True,
    shard_by_process=False,
  )
  assert [b.tolist() for b in batches] == [b.tolist() for b in expected]


def test_global_order_gives_every_process_count_the_same_global_batches():
  def global_batches(count, steps=7):
    its = [
      pipeline.batch_iterator(
        grain.MapDataset.range(30),
        6 // count,
        shuffle=True,
        seed=5,
        num_epochs=None,
        drop_remainder=True,
        process_index=i,
        process_count=count,
        global_order=True,
      )
      for i in range(count)
    ]
    return [np.concatenate([np.asarray(next(it)) for it in its]) for _ in range(steps)]

  one = global_batches(1)
  for count in (2, 3):
    for a, b in zip(one, global_batches(count)):
      np.testing.assert_array_equal(a, b)
  # 7 steps of 6 cover the first epoch (30 elements) and then a reshuffled second one.
  assert sorted(np.concatenate(one[:5]).tolist()) == list(range(30))
