"""Training the RQ-VAE on (image, caption) embedding pairs: sharded state, jitted step, k-means.

`RQVAETrainer` owns the compiled functions for one model config on one mesh:
  * `init_state()` creates the train state already sharded (codebooks replicated, batch
    sharded over `data`/`fsdp`, MLP widths over `model`);
  * `kmeans_init(state, images)` fills the codebooks by k-means on encoder outputs of the first
    batch(es), as the reference does lazily on its first forward pass;
  * `train_step(state, images, captions)` is one AdamW step, jitted with explicit in/out
    shardings and the state donated; it also tracks when each codeword was last used and,
    when enabled, restarts dead codewords;
  * `encode_images(state, images)` assigns codes in inference mode, batched and sharded.
`PairSampler` draws the same global batches on every process from (seed, step) alone, so a
resumed run sees the batches it would have seen.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from avg_jax import partitioning
from avg_jax.errors import UserError
from avg_jax.progress import progress
from avg_jax.tokenizer import kmeans as kmeans_lib
from avg_jax.tokenizer import losses as losses_lib
from avg_jax.tokenizer import quantizer
from avg_jax.tokenizer.model import RQVAE, RQVAEConfig


@flax.struct.dataclass
class TokenizerState:
  step: jax.Array  # int32 []
  params: Any
  batch_stats: Any
  opt_state: Any
  last_used: jax.Array  # int32[C, K] step at which each codeword was last chosen


@dataclasses.dataclass(frozen=True)
class TrainOptions:
  learning_rate: float = 1e-4
  weight_decay: float = 0.0
  dead_code_after: int = 0  # 0: no dead-code restart
  kmeans_iters: int = 20
  kmeans_init_method: str = "kmeans++"
  seed: int = 0

  @classmethod
  def from_config(cls, tok: Any, seed: int) -> "TrainOptions":
    if tok.kmeans_init_method not in ("kmeans++", "random"):
      raise UserError(
        f"config key tokenizer.kmeans_init_method must be 'kmeans++' or 'random', "
        f"got {tok.kmeans_init_method!r}"
      )
    return cls(
      learning_rate=float(tok.learning_rate),
      weight_decay=float(tok.weight_decay),
      dead_code_after=int(tok.dead_code_after) if tok.dead_code_restart else 0,
      kmeans_iters=int(tok.kmeans_iters),
      kmeans_init_method=str(tok.kmeans_init_method),
      seed=int(seed),
    )


def data_parallel_size(mesh: Mesh) -> int:
  """How many shards the `batch` logical axis is split into on `mesh`."""
  spec = partitioning.logical_sharding(mesh, "batch").spec[0]
  axes = spec if isinstance(spec, tuple) else (spec,) if spec else ()
  return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


class PairSampler:
  """Global batches of (image, caption) embedding pairs, reshuffled every epoch.

  `image_emb [N, D]`, `caption_emb [M, D]`, `caption_image_index int[M]` (row of each caption's
  image). Batch `step` is a pure function of (seed, step); each process gets its own slice of
  rows of the global batch (`shard_host_batch` concatenates them in process order).
  """

  def __init__(
    self,
    image_emb: np.ndarray,
    caption_emb: np.ndarray,
    caption_image_index: np.ndarray,
    batch_size: int,
    seed: int,
  ):
    self.image_emb = np.asarray(image_emb, np.float32)
    self.caption_emb = np.asarray(caption_emb, np.float32)
    self.caption_image_index = np.asarray(caption_image_index, np.int64)
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.num_pairs = len(self.caption_emb)
    if self.num_pairs < self.batch_size:
      raise UserError(
        f"tokenizer.batch_size={batch_size} exceeds the {self.num_pairs} "
        f"training (image, caption) pairs; lower tokenizer.batch_size"
      )
    self.steps_per_epoch = self.num_pairs // self.batch_size
    self._epoch = -1
    self._perm = np.zeros((0,), np.int64)  # this epoch's order (set on first use)
    pcount, pindex = jax.process_count(), jax.process_index()
    if self.batch_size % pcount:
      raise UserError(
        f"tokenizer.batch_size={batch_size} is not divisible by the {pcount} processes"
      )
    local = self.batch_size // pcount
    self._rows = slice(pindex * local, (pindex + 1) * local)

  def indices(self, step: int) -> np.ndarray:
    """Pair indices `[batch_size]` of global batch `step` (the remainder of an epoch is dropped)."""
    epoch, i = divmod(int(step), self.steps_per_epoch)
    if epoch != self._epoch:
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_pairs)
      self._epoch = epoch
    return self._perm[i * self.batch_size : (i + 1) * self.batch_size]

  def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """This process's rows of batch `step`: (images [b, D], captions [b, D])."""
    idx = self.indices(step)[self._rows]
    return self.image_emb[self.caption_image_index[idx]], self.caption_emb[idx]


@dataclasses.dataclass(frozen=True)
class TrainerSettings:
  """Everything the compiled programs depend on besides shapes and shardings: hashable, so
  the programs are module-level functions that take it as a static argument and every
  trainer with equal settings in a process reuses one compile."""

  cfg: RQVAEConfig
  weights: losses_lib.LossWeights
  options: TrainOptions
  batch_size: int

  def model(self) -> RQVAE:
    return RQVAE(self.cfg)

  def optimizer(self) -> optax.GradientTransformation:
    return optax.adamw(self.options.learning_rate, weight_decay=self.options.weight_decay)

  def keys(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Independent streams: parameter init, per-step dropout (folded with the step), k-means."""
    return tuple(jax.random.split(jax.random.key(self.options.seed), 3))


def _boxed_init(settings: TrainerSettings, key: jax.Array) -> TokenizerState:
  dummy = jnp.zeros((settings.batch_size, settings.cfg.in_dim), jnp.float32)
  variables = settings.model().init({"params": key}, dummy, train=False)
  params = variables["params"]
  return TokenizerState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=settings.optimizer().init(params),
    last_used=jnp.zeros((settings.cfg.num_codebooks, settings.cfg.codebook_size), jnp.int32),
  )


def _variables(state: TokenizerState) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}


def _init_latents(settings: TrainerSettings, state: TokenizerState, images: jax.Array) -> jax.Array:
  # Train mode (dropout, batch statistics) as the reference's lazy init on its first forward;
  # the BatchNorm statistics this pass would update are discarded.
  latents, _ = settings.model().apply(
    _variables(state),
    images,
    train=True,
    method=RQVAE.encode,
    rngs={"dropout": settings.keys()[2]},
    mutable=["batch_stats"],
  )
  return latents


def _train_step(
  settings: TrainerSettings, state: TokenizerState, images: jax.Array, captions: jax.Array
) -> tuple[TokenizerState, dict]:
  model, options = settings.model(), settings.options
  rng = jax.random.fold_in(settings.keys()[1], state.step)

  def loss_fn(params):
    outputs, mutated = model.apply(
      {"params": params, "batch_stats": state.batch_stats},
      images,
      train=True,
      rngs={"dropout": rng},
      mutable=["batch_stats"],
    )
    total, parts = losses_lib.total_loss(outputs, images, captions, settings.weights)
    return total, (parts, mutated["batch_stats"], outputs["rq"])

  (_, (parts, batch_stats, rq)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = settings.optimizer().update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  step = state.step + 1
  if options.dead_code_after > 0:
    books, last_used, restarted = quantizer.restart_dead_codes(
      params["codebooks"], state.last_used, step, rq, dead_after=options.dead_code_after
    )
    params = dict(params, codebooks=books)
  else:
    last_used = _mark_used(state.last_used, step, rq.codes)
    restarted = jnp.zeros((), jnp.int32)
  counts = quantizer.code_counts(rq.codes, settings.cfg.codebook_size)  # [L, K]
  metrics = dict(
    parts,
    perplexity=quantizer.perplexity(counts),
    unused_share=quantizer.unused_share(counts),
    restarted_codes=restarted,
  )
  new_state = TokenizerState(
    step=step, params=params, batch_stats=batch_stats, opt_state=opt_state, last_used=last_used
  )
  return new_state, metrics


def _encode(settings: TrainerSettings, state: TokenizerState, images: jax.Array):
  model, variables = settings.model(), _variables(state)
  # flax types apply's result as output | (output, state); without mutable= it is the output.
  latent: jax.Array = model.apply(variables, images, train=False, method=RQVAE.encode)  # type: ignore[assignment]
  codes = quantizer.quantize_codes(latent, state.params["codebooks"], settings.cfg.num_levels)
  quantized = quantizer.decode_codes(codes, state.params["codebooks"])
  decoded = model.apply(variables, quantized, train=False, method=RQVAE.decode)
  return codes, decoded, latent


def _codes(settings: TrainerSettings, state: TokenizerState, images: jax.Array) -> jax.Array:
  # flax types apply's result as output | (output, state); without mutable= it is the output.
  return settings.model().apply(_variables(state), images, method=RQVAE.codes)  # type: ignore[return-value]


class RQVAETrainer:
  """Compiled init / k-means / train / encode functions for one RQ-VAE on one mesh."""

  def __init__(
    self,
    cfg: RQVAEConfig,
    weights: losses_lib.LossWeights,
    mesh: Mesh,
    options: TrainOptions,
    batch_size: int,
  ):
    self.cfg, self.weights, self.mesh, self.options = cfg, weights, mesh, options
    self.batch_size = int(batch_size)
    shards = data_parallel_size(mesh)
    if self.batch_size % shards:
      raise UserError(
        f"tokenizer.batch_size={batch_size} must be divisible by the {shards} "
        f"data-parallel shards of mesh {dict(mesh.shape)}"
      )
    self.settings = TrainerSettings(cfg, weights, options, self.batch_size)
    self.init_key, self.dropout_key, self.kmeans_key = self.settings.keys()
    self.batch_sharding = partitioning.logical_sharding(mesh, "batch", None)
    self.replicated = partitioning.replicated(mesh)
    abstract = jax.eval_shape(lambda key: _boxed_init(self.settings, key), jax.random.key(0))
    self.state_shardings = partitioning.logical_to_sharding(nn.get_partition_spec(abstract), mesh)
    self.abstract_state = partitioning.abstract(nn.unbox(abstract), self.state_shardings)
    # Called as `jitted_train_step(settings, state, images, captions)`.
    self.jitted_train_step = jax.jit(
      _train_step,
      static_argnums=0,
      in_shardings=(self.state_shardings, self.batch_sharding, self.batch_sharding),
      out_shardings=(self.state_shardings, self.replicated),
      donate_argnums=(1,),
    )
    self._encode = functools.partial(
      jax.jit(
        _encode,
        static_argnums=0,
        in_shardings=(self.state_shardings, self.batch_sharding),
        out_shardings=(self.replicated, self.replicated, self.replicated),
      ),
      self.settings,
    )
    self._codes = functools.partial(
      jax.jit(
        _codes,
        static_argnums=0,
        in_shardings=(self.state_shardings, self.batch_sharding),
        out_shardings=self.replicated,
      ),
      self.settings,
    )
    self._init_latents = functools.partial(
      jax.jit(
        _init_latents,
        static_argnums=0,
        in_shardings=(self.state_shardings, self.batch_sharding),
        out_shardings=self.replicated,
      ),
      self.settings,
    )

  # --- State ----------------------------------------------------------------------------------

  def init_state(self) -> TokenizerState:
    """A fresh state, created sharded (no host holds an unsharded copy)."""
    state, _ = partitioning.sharded_init(
      _boxed_init, self.mesh, self.init_key, static=(self.settings,)
    )
    return state

  # --- k-means initialisation -----------------------------------------------------------------

  def kmeans_init(self, state: TokenizerState, images: np.ndarray) -> TokenizerState:
    """Replaces the codebooks by (residual) k-means of the encoder outputs of `images [n, in]`.

    `images` are this process's rows; n must be a multiple of the per-process batch.
    """
    local = self.batch_size // jax.process_count()
    chunks = []
    with partitioning.activation_context(self.mesh):
      for start in range(0, len(images) - local + 1, local):
        chunk = partitioning.shard_host_batch(images[start : start + local], self.mesh)
        chunks.append(self._init_latents(state, chunk))
    latents = jnp.concatenate(chunks)  # [n, e_dim]
    books = kmeans_lib.residual_kmeans(
      jax.random.fold_in(self.kmeans_key, 1),
      latents,
      self.cfg.codebook_size,
      self.cfg.num_levels,
      self.cfg.num_codebooks,
      iters=self.options.kmeans_iters,
      init=self.options.kmeans_init_method,
    )
    books = jax.device_put(books, self.state_shardings.params["codebooks"])
    params = dict(state.params, codebooks=books)
    return dataclasses.replace(state, params=params)

  # --- Training -------------------------------------------------------------------------------

  def train_step(
    self, state: TokenizerState, images: np.ndarray, captions: np.ndarray
  ) -> tuple[TokenizerState, dict]:
    """One step on this process's rows `images [b, in]`, `captions [b, in]`; `state` is donated."""
    with partitioning.activation_context(self.mesh):
      images = partitioning.shard_host_batch(images, self.mesh)
      captions = partitioning.shard_host_batch(captions, self.mesh)
      return self.jitted_train_step(self.settings, state, images, captions)

  # --- Inference ------------------------------------------------------------------------------

  def assign_codes(
    self,
    state: TokenizerState,
    images: np.ndarray,
    *,
    batch_size: int | None = None,
    desc: str = "assign",
  ) -> np.ndarray:
    """Identifiers only: all `images [N, in]` -> numpy int32[N, L]."""
    return self._batched(self._codes, state, images, batch_size, desc)[0].astype(np.int32)

  def encode_images(
    self,
    state: TokenizerState,
    images: np.ndarray,
    *,
    batch_size: int | None = None,
    desc: str = "assign",
  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inference on all `images [N, in]` (every process passes all of them).

    Returns numpy `(codes int32[N, L], decoded [N, in], latent [N, e_dim])`.
    """
    codes, decoded, latent = self._batched(self._encode, state, images, batch_size, desc)
    return codes.astype(np.int32), decoded, latent

  def _batched(
    self, fn, state: TokenizerState, images: np.ndarray, batch_size: int | None, desc: str
  ) -> tuple[np.ndarray, ...]:
    """Applies jitted `fn(state, batch)` to whole batches of `images` (last one zero-padded)."""
    batch_size = int(batch_size or self.batch_size)
    shards = data_parallel_size(self.mesh)
    batch_size = max(shards, batch_size - batch_size % shards)
    n = len(images)
    pcount, pindex = jax.process_count(), jax.process_index()
    local = batch_size // pcount
    outs = []
    with partitioning.activation_context(self.mesh):
      starts = range(0, n, batch_size)
      for start in progress(starts, total=len(starts), desc=desc):
        chunk = np.zeros((batch_size, images.shape[1]), np.float32)
        rows = images[start : start + batch_size]
        chunk[: len(rows)] = rows
        mine = chunk[pindex * local : (pindex + 1) * local]
        out = fn(state, partitioning.shard_host_batch(mine, self.mesh))
        outs.append(tuple(np.asarray(o) for o in jax.tree.leaves(out)))
    return tuple(np.concatenate(parts)[:n] for parts in zip(*outs))


def _mark_used(last_used: jax.Array, step: jax.Array, codes: jax.Array) -> jax.Array:
  """`last_used [C, K]` with every codeword chosen in `codes [B, L]` set to `step`."""
  num_codebooks = last_used.shape[0]
  rows = []
  for c in range(num_codebooks):
    levels = [
      lv for lv in range(codes.shape[1]) if quantizer.codebook_index(lv, num_codebooks) == c
    ]
    used = jnp.zeros(last_used.shape[1:], jnp.bool_).at[codes[:, levels].reshape(-1)].set(True)
    rows.append(jnp.where(used, step, last_used[c]))
  return jnp.stack(rows)
