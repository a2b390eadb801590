"""Two prefix trees searched as one: a large static `base` and a small `delta` of added images.

A live index grows without rebuilding its big tree: images added since the last compaction
live in a delta tree built from them alone (cost O(added), independent of the index size),
and the search walks both at once. A node of the union is a pair `(base node, delta node)`,
either -1 where the prefix exists in one tree only; its children are the union of both
trees' children (a code present in both leads to the pair of their children). The beam search
carries the pair as a composite node (`beam_search.BeamState.node` is a pytree).

Order of a union node's children (ties in the beam search, which keeps the lower slot): the
base's children by code, then the delta's codes that the base lacks. A union leaf's images:
the base's, then the delta's, each in id order. Removed images are marked dead in either
tree (`item_alive`) and subtrees left without a live image are masked (`node_alive`), so the
search never enters them; their nodes stay until the next compaction.
"""

import flax.struct
import jax
import jax.numpy as jnp

from avg_jax.decoding.trie import DeviceTrie
from avg_jax.errors import UserError


@flax.struct.dataclass
class UnionTrie:
  """`base` and `delta` (`DeviceTrie`s over the same positions) as one constraint."""

  base: DeviceTrie
  delta: DeviceTrie

  @classmethod
  def of(cls, base: DeviceTrie, delta: DeviceTrie) -> "UnionTrie":
    if tuple(base.position_sizes) != tuple(delta.position_sizes):
      raise UserError(
        f"union trie: position sizes differ: {list(base.position_sizes)} vs "
        f"{list(delta.position_sizes)}"
      )
    if (base.item_emb is None) != (delta.item_emb is None):
      raise UserError("union trie: both trees need item embeddings, or neither")
    return cls(base=base, delta=delta)

  @property
  def position_sizes(self) -> tuple[int, ...]:
    return self.base.position_sizes

  @property
  def id_length(self) -> int:
    return self.base.id_length

  @property
  def widths(self) -> tuple[int, ...]:
    return tuple(
      kb if db else min(kb + kd, k)
      for kb, kd, k, db in zip(
        self.base.widths, self.delta.widths, self.position_sizes, self.base.dense
      )
    )

  @property
  def max_group(self) -> int:
    return self.base.max_group + self.delta.max_group

  @property
  def item_emb(self):
    return self.base.item_emb  # presence only (`search.expand_leaves` asks)

  @property
  def nbytes(self) -> int:
    return self.base.nbytes + self.delta.nbytes

  @property
  def embedding_nbytes(self) -> int:
    return self.base.embedding_nbytes + self.delta.embedding_nbytes

  def root_node(self, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    return jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.int32)

  def children(self, level: int, node: tuple[jax.Array, jax.Array], width: int):
    """`(codes [n, width], (base child, delta child) [n, width] each, valid [n, width])`."""
    nb, nd = node
    n = nb.shape[0]
    codes_d, child_d, valid_d = self.delta.children_guarded(level, nd, self.delta.widths[level])
    if self.base.dense[level]:
      # The base's window is every code: scatter the delta's children into the same slots.
      _, child_b, valid_b = self.base.children_guarded(level, nb, self.base.widths[level])
      k = child_b.shape[1]
      # Slot c holds code c. (Not the base's codes: those are zeroed where the base has no
      # child, which would label a delta-only child with code 0.)
      codes = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), child_b.shape)
      rows = jnp.broadcast_to(jnp.arange(n)[:, None], codes_d.shape)
      child_dd = (
        jnp.full((n, k), -1, jnp.int32)
        .at[rows, jnp.where(valid_d, codes_d, k)]
        .set(child_d, mode="drop")
      )
      valid = valid_b | (child_dd >= 0)
      out = codes, (jnp.where(valid_b, child_b, -1), child_dd), valid
    else:
      codes_b, child_b, valid_b = self.base.children_guarded(level, nb, self.base.widths[level])
      same = (codes_b[:, :, None] == codes_d[:, None, :]) & valid_d[:, None, :]  # [n, Wb, Wd]
      matched = jnp.take_along_axis(child_d, jnp.argmax(same, axis=-1), axis=-1)
      child_db = jnp.where(same.any(-1) & valid_b, matched, -1)
      in_base = ((codes_d[:, :, None] == codes_b[:, None, :]) & valid_b[:, None, :]).any(-1)
      only_d = valid_d & ~in_base
      codes = jnp.concatenate([codes_b, codes_d], axis=1)
      child = (
        jnp.concatenate([child_b, jnp.full_like(child_d, -1)], axis=1),
        jnp.concatenate([child_db, jnp.where(only_d, child_d, -1)], axis=1),
      )
      out = codes, child, jnp.concatenate([valid_b, only_d], axis=1)
    codes, (cb, cd), valid = out
    have = codes.shape[1]
    if have < width:  # pad to the window the search asks for
      pad = lambda x, v: jnp.pad(x, ((0, 0), (0, width - have)), constant_values=v)
      codes, cb, cd, valid = pad(codes, 0), pad(cb, -1), pad(cd, -1), pad(valid, False)
    elif have > width:
      # Keep the valid slots first (stable), then cut: a union window can hold at most
      # `min(Wb + Wd, K)` distinct codes, which `widths` reports.
      order = jnp.argsort(~valid, axis=1, stable=True)[:, :width]
      take = lambda x: jnp.take_along_axis(x, order, axis=1)
      codes, cb, cd, valid = take(codes), take(cb), take(cd), take(valid)
    return codes, (cb, cd), valid

  def members(self, leaf: tuple[jax.Array, jax.Array], width: int, with_embeddings: bool):
    """A union leaf's images: the base's, then the delta's (see `DeviceTrie.members`)."""
    lb, ld = leaf
    ib, vb, eb = self.base.members(lb, min(width, self.base.max_group), with_embeddings)
    idd, vd, ed = self.delta.members(ld, min(width, self.delta.max_group), with_embeddings)
    emb = (
      jnp.concatenate([eb, ed], axis=-2)
      if with_embeddings and eb is not None and ed is not None
      else None
    )
    return (jnp.concatenate([ib, idd], axis=-1), jnp.concatenate([vb, vd], axis=-1), emb)
