"""Meshes, the logical-axis rules table, sharded parameter creation and host-batch sharding.

Every model annotates parameters (`nn.with_logical_partitioning`) and activations
(`nn.with_logical_constraint`) with *logical* axis names. One rules table maps them onto the mesh
axes `data`, `fsdp` and `model`: `LOGICAL_RULES` by default, or the config's
`partitioning.rules` (config data: the CLI runs each command inside `rules_in_use`). Changing
how a model shards means changing that table or the mesh shape in the config, never the model
code.
"""

import contextlib
import contextvars
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from avg_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "model")

# Logical axis name -> mesh axis (or axes). The first matching rule whose mesh axes are still
# free in that array wins (flax semantics), so `batch` takes data+fsdp and parameters shard
# their `embed` dimension over fsdp (ZeRO-3 style) and their wide dimension over `model`.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
  ("batch", ("data", "fsdp")),
  # Indexed items (embeddings for brute-force search, trie nodes) shard like a batch.
  ("items", ("data", "fsdp")),
  ("beam", None),
  ("length", None),
  ("kv_length", None),
  ("embed", "fsdp"),
  ("mlp", "model"),
  ("heads", "model"),
  ("kv", None),
  ("vocab", "model"),
  # Codebooks are small (K x e_dim) and read by every example: replicate them.
  ("codebook", None),
  ("code_dim", None),
  ("levels", None),
  ("layers", None),  # the stacked axis of nn.scan
  ("relpos_buckets", None),
  ("patch", None),
  ("channels", None),
  ("image_pixels", None),
)


# The table in use, scoped (a context variable, not a module global): `rules_in_use` sets it
# for one block, so two configs in one process (tests, notebooks) never see each other's.
_rules_in_use: contextvars.ContextVar = contextvars.ContextVar(
  "avg_jax_logical_rules", default=LOGICAL_RULES
)


def _as_axes(value: Any) -> Any:
  """A rule's mesh axes as flax reads them: None, one axis name, or a tuple of names."""
  if value is None or isinstance(value, str):
    return value
  return tuple(value)


def checked_rules(rules: Sequence[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
  """`rules` (`((logical name, mesh axes), ...)`, e.g. the config's `partitioning.rules`) as
  a rules table; a one-line `UserError` naming the bad entry otherwise."""
  table = []
  for i, rule in enumerate(rules):
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise UserError(
        f"config partitioning.rules[{i}]: expected (logical name, mesh axes), got {rule!r}"
      )
    axes = _as_axes(rule[1])
    names = () if axes is None else (axes,) if isinstance(axes, str) else axes
    unknown = [a for a in names if a not in MESH_AXES]
    if unknown:
      raise UserError(
        f"config partitioning.rules[{i}] ({rule[0]!r}): unknown mesh axis "
        f"{unknown[0]!r} (known: {', '.join(MESH_AXES)})"
      )
    table.append((rule[0], axes))
  return tuple(table)


@contextlib.contextmanager
def rules_in_use(rules: Sequence[Sequence[Any]]) -> Iterator[tuple[tuple[str, Any], ...]]:
  """Within the block, every function here given no `rules` uses `rules` (checked)."""
  token = _rules_in_use.set(checked_rules(rules))
  try:
    yield _rules_in_use.get()
  finally:
    _rules_in_use.reset(token)


def active_rules() -> tuple[tuple[str, Any], ...]:
  """The table in use: `LOGICAL_RULES` outside any `rules_in_use` block."""
  return _rules_in_use.get()


def _or_active(rules: Sequence[tuple[str, Any]] | None) -> Sequence[tuple[str, Any]]:
  return active_rules() if rules is None else rules


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves `{"data": -1, "fsdp": 1, "model": 2}` into sizes over `MESH_AXES`.

  At most one axis may be -1 ("the rest"); the product must equal `num_devices`.
  """
  sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise UserError(f"mesh: unknown axis {sorted(unknown)[0]!r} (known: {', '.join(MESH_AXES)})")
  if sizes.count(-1) > 1:
    raise UserError("mesh: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise UserError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise UserError(f"mesh: {num_devices} devices do not divide into fixed axes of size {fixed}")
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise UserError(
      f"mesh: shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
      f"devices, {num_devices} are available"
    )
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """Builds a `Mesh` over all (global) devices with axes `MESH_AXES`."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    # Topology-aware placement is only defined for some TPU shapes; fall back to plain order.
    device_array = np.asarray(devices).reshape(shape)
  # jax.sharding.Mesh gives Auto axis types: partitioning is driven by shardings and the rules
  # table (jax.make_mesh would default to Explicit axes in this jax version).
  return Mesh(device_array, MESH_AXES)


def logical_to_sharding(
  logical_specs: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] | None = None
) -> Any:
  """Maps a pytree of logical `PartitionSpec`s to a pytree of `NamedSharding`s."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, _or_active(rules))


def logical_sharding(
  mesh: Mesh, *names: str | None, rules: Sequence[tuple[str, Any]] | None = None
) -> NamedSharding:
  """The `NamedSharding` for one array whose dimensions have logical `names`."""
  return logical_to_sharding(PartitionSpec(*names), mesh, rules)


def abstract(tree: Any, shardings: Any = None, *, dtype: Any = None) -> Any:
  """`jax.ShapeDtypeStruct`s of `tree`'s leaves (arrays or shapes), with `shardings` (a
  matching tree; default: each leaf's own `.sharding`) and optionally another `dtype`: the
  targets of a restore or the arguments of an ahead-of-time compile."""
  if shardings is None:
    shardings = jax.tree.map(lambda x: x.sharding, tree)
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype if dtype is None else dtype, sharding=s),
    tree,
    shardings,
  )


def replicated(mesh: Mesh) -> NamedSharding:
  """A fully replicated sharding on `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def _unboxed(init_fn: Callable[..., Any], static: tuple, *args: Any) -> Any:
  return nn.unbox(init_fn(*static, *args))


def sharded_init(
  init_fn: Callable[..., Any],
  mesh: Mesh,
  *args: Any,
  static: tuple = (),
  rules: Sequence[tuple[str, Any]] | None = None,
) -> tuple[Any, Any]:
  """Creates variables already sharded: no host ever holds the full unsharded tree.

  `init_fn(*static, *args)` returns a variable tree whose leaves may be
  `nn.LogicallyPartitioned` boxes. Returns `(variables, shardings)` with boxes removed and
  `shardings` a matching tree of `NamedSharding`s (leaves without annotation are replicated).
  A module-level `init_fn` with its configuration in `static` (hashable) compiles once per
  process for equal configurations and shapes; a lambda compiles on every call.
  """
  rules = _or_active(rules)
  static = tuple(static)
  abstract = jax.eval_shape(lambda *a: init_fn(*static, *a), *args)
  shardings = logical_to_sharding(nn.get_partition_spec(abstract), mesh, rules)
  with activation_context(mesh, rules):
    variables = jax.jit(_unboxed, static_argnums=(0, 1), out_shardings=shardings)(
      init_fn, static, *args
    )
  return variables, shardings


def param_specs(
  abstract_variables: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] | None = None
) -> Any:
  """Mesh `PartitionSpec` per leaf of a (possibly boxed) abstract variable tree."""
  shardings = logical_to_sharding(nn.get_partition_spec(abstract_variables), mesh, rules)
  return jax.tree.map(lambda s: s.spec, shardings)


@contextlib.contextmanager
def activation_context(
  mesh: Mesh, rules: Sequence[tuple[str, Any]] | None = None
) -> Iterator[None]:
  """Makes `nn.with_logical_constraint` inside models resolve against `mesh` and `rules`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(_or_active(rules)):
    yield


def shard_host_batch(
  batch: Any, mesh: Mesh, *names: str | None, rules: Sequence[tuple[str, Any]] | None = None
) -> Any:
  """Turns each process's local numpy batch into global arrays sharded along `batch`.

  Every leaf is `[local_batch, ...]`; the global batch is the concatenation over processes in
  process order. `names` are the logical names of the leading dims (default: `batch` only).
  """
  names = names or ("batch",)
  rules = _or_active(rules)

  def put(x):
    x = np.asarray(x)
    spec = PartitionSpec(*names, *([None] * (x.ndim - len(names))))
    sharding = logical_to_sharding(spec, mesh, rules)
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(put, batch)


def maybe_initialize_distributed(distributed_config: Mapping[str, Any]) -> None:
  """Calls `jax.distributed.initialize` when the config (or a TPU pod environment) asks.

  `distributed_config`: `enabled` ("auto" | True | False), `coordinator_address`,
  `num_processes`, `process_id`, `cpu_collectives` (e.g. "gloo" for multi-process CPU runs).
  "auto" initialises when `JAX_COORDINATOR_ADDRESS` is set or on a multi-host TPU VM
  (`TPU_WORKER_HOSTNAMES` with more than one host), where jax discovers the rest itself.
  """
  enabled = distributed_config.get("enabled", "auto")
  if isinstance(enabled, str) and enabled.lower() != "auto":
    if enabled.lower() not in ("true", "false"):
      raise UserError(
        f"config key distributed.enabled: expected auto, true or false, got {enabled!r}"
      )
    enabled = enabled.lower() == "true"
  if enabled == "auto":
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    enabled = bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or hosts.count(",") >= 1
  if not enabled or jax.distributed.is_initialized():
    return
  collectives = distributed_config.get("cpu_collectives", "")
  if collectives:
    jax.config.update("jax_cpu_collectives_implementation", collectives)
  kwargs = {}
  if distributed_config.get("coordinator_address"):
    kwargs = dict(
      coordinator_address=distributed_config["coordinator_address"],
      num_processes=int(distributed_config["num_processes"]),
      process_id=int(distributed_config["process_id"]),
    )
  jax.distributed.initialize(**kwargs)
