"""The identifier schemes: image embeddings -> codes and a codebook, then unique identifiers.

Schemes: `avg` (RQ-VAE with caption alignment), `rq` (same without the alignment term),
`hkmeans` (hierarchical k-means of image embeddings), `atomic` and `random` (arbitrary ids;
see `ids.py`). The learned schemes use `tokenizer.shared_codebook`; the others always use
per-position tokens (a code means something different at each position). Codebook rows:
avg / rq: the trained codebook (e_dim wide already); hkmeans: per-level residual means of the
image embeddings (`hkmeans.level_codebook`), mapped to e_dim by a fixed Gaussian random
projection (entries N(0, 1/e_dim), seeded) when the embedding width differs; atomic / random:
N(0, 1) entries (T5's own embedding initialisation scale).

Identifiers are made unique within each index -- each split -- by one disambiguation position
(`tokenizer.disambiguation`, `ids.disambiguate_per_index`): an image's identifier never depends
on images of other splits. D is the largest group over all images together, so that an index
made of several splits (an export) can be disambiguated with the same tokens. The collision
rate before disambiguation is reported per split (`identifiers`).
"""

import functools
import logging
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from avg_jax import partitioning
from avg_jax.artifacts import paths
from avg_jax.artifacts.checkpoints import Checkpointer
from avg_jax.errors import UserError
from avg_jax.metrics import MetricsWriter, format_metric
from avg_jax.progress import progress
from avg_jax.tokenizer import analysis, hkmeans, ids, quantizer
from avg_jax.tokenizer import losses as losses_lib
from avg_jax.tokenizer import model as model_lib
from avg_jax.tokenizer import train as train_lib
from avg_jax.vokens import VokenVocabulary

log = logging.getLogger(__name__)


def learned_codes(
  config, workdir: str, directory: str, embeddings: dict, fit: dict, scheme: str, name: str
) -> tuple[dict, np.ndarray, dict]:
  """avg / rq: trains (or resumes, from checkpoints in `directory`) the RQ-VAE on the pairs of
  `fit` (`fit.fit_pairs`); -> ({split: codes [N, L]}, codebook, {split: stats})."""
  tok = config.tokenizer
  cfg = model_lib.RQVAEConfig.from_config(tok, in_dim=fit["image_emb"].shape[1])
  weights = losses_lib.LossWeights.from_config(tok, scheme)
  if weights.align_position == "latent" and weights.align and cfg.e_dim != cfg.in_dim:
    raise UserError(
      f"tokenizer.align_position='latent' needs tokenizer.e_dim={cfg.in_dim} "
      f"(the embedding width), got {cfg.e_dim}"
    )
  trainer = train_lib.RQVAETrainer(
    cfg,
    weights,
    partitioning.make_mesh(config.mesh),
    train_lib.TrainOptions.from_config(tok, config.seed),
    int(tok.batch_size),
  )
  sampler = train_lib.PairSampler(
    fit["image_emb"],
    fit["caption_emb"],
    fit["caption_image_index"],
    int(tok.batch_size),
    seed=int(config.seed),
  )
  state = _train(trainer, sampler, tok, workdir, directory, name)

  codes, stats = {}, {}
  for split, data in embeddings.items():
    split_codes, decoded, latent = trainer.encode_images(
      state, data["image_emb"], batch_size=int(tok.assign_batch_size), desc=f"assign {split}"
    )
    codes[split] = split_codes
    aligned = decoded if weights.align_position == "decoder" else latent
    recon = float(np.mean(np.square(decoded - data["image_emb"])))
    align = (
      float(np.mean(np.square(aligned[data["caption_image_index"]] - data["caption_emb"])))
      if aligned.shape[1] == data["caption_emb"].shape[1]
      else float("nan")
    )
    stats[split] = dict(recon_mse=recon, align_mse=align)
  books = np.asarray(jax.device_get(state.params["codebooks"]), np.float32)
  return codes, books.reshape(-1, cfg.e_dim), stats


def final_rqvae(config, directory: str, in_dim: int) -> tuple[model_lib.RQVAEConfig, dict, dict]:
  """The trained RQ-VAE of a finished avg / rq fit in `directory` (its newest checkpoint):
  `(config, params, batch_stats)` on the host, for an export to tokenize new images with."""
  tok = config.tokenizer
  cfg = model_lib.RQVAEConfig.from_config(tok, in_dim=in_dim)
  # Only the abstract state is needed to restore; the trainer builds it for this mesh.
  trainer = train_lib.RQVAETrainer(
    cfg,
    losses_lib.LossWeights.from_config(tok, "avg"),
    partitioning.make_mesh(config.mesh),
    train_lib.TrainOptions.from_config(tok, config.seed),
    int(tok.batch_size),
  )
  checkpointer = Checkpointer(
    paths.checkpoints_dir(directory), keep=int(tok.keep_checkpoints), async_save=False
  )
  try:
    found = checkpointer.restore_latest_good(trainer.abstract_state)
  finally:
    checkpointer.close()
  if found is None:
    raise UserError(
      f"{paths.checkpoints_dir(directory)}: no RQ tokenizer checkpoint; run "
      f"`avg-jax tokenize` first"
    )
  state = found[1]
  return cfg, jax.device_get(state.params), jax.device_get(state.batch_stats)


def _train(
  trainer: train_lib.RQVAETrainer,
  sampler: train_lib.PairSampler,
  tok,
  workdir: str,
  directory: str,
  name: str,
) -> train_lib.TokenizerState:
  """The training loop: resume from the newest good checkpoint or init + k-means, then train.

  Checkpoints go through `artifacts.checkpoints.Checkpointer`, as in the train and rank
  stages: a damaged newest checkpoint is reported and the previous one used. Batches are a
  function of the step (`sampler.batch(step)`), so no iterator state is saved.
  """
  checkpointer = Checkpointer(
    paths.checkpoints_dir(directory), keep=int(tok.keep_checkpoints), async_save=False
  )
  found = checkpointer.restore_latest_good(trainer.abstract_state)
  writer = MetricsWriter(
    workdir, "tokenize", process_index=jax.process_index(), run={"method": name}
  )
  if found is not None:
    state = found[1]
    print(f"tokenize {name}: resumed from step {int(state.step)} ({checkpointer.directory})")
    writer.drop_after(int(state.step))  # those steps are redone: keep each step's record once
  else:
    state = trainer.init_state()
    if tok.kmeans_init:
      t0 = time.time()
      first = np.concatenate([sampler.batch(s)[0] for s in range(int(tok.kmeans_init_batches))])
      state = trainer.kmeans_init(state, first)
      jax.block_until_ready(state.params["codebooks"])
      log.info(
        "tokenizer: k-means init on %d encoder outputs in %.1fs",
        len(first) * jax.process_count(),
        time.time() - t0,
      )

  meta = {"stage": "tokenize", "scheme": name}
  steps, start = int(tok.steps), int(state.step)
  log_every, ckpt_every = max(1, int(tok.log_every)), max(1, int(tok.checkpoint_every))
  t0, last_logged = time.time(), start
  for step in progress(range(start, steps), total=steps - start, desc=f"tokenize {name}"):
    state, metrics = trainer.train_step(state, *sampler.batch(step))
    done = step + 1
    if done % log_every == 0 or done == steps:
      metrics = jax.tree.map(np.asarray, metrics)  # the only host sync in the loop
      elapsed = time.time() - t0
      writer.write(
        step=done,
        split="train",
        examples_per_s=(done - last_logged) * sampler.batch_size / max(elapsed, 1e-9),
        **metrics,
      )
      t0, last_logged = time.time(), done
    if done % ckpt_every == 0 and done != steps:
      checkpointer.save(done, state, metadata=meta)
  if checkpointer.latest_step() != int(state.step):
    checkpointer.save(int(state.step), state, metadata=meta)
  checkpointer.wait()
  checkpointer.close()
  return state


def _project(rows: np.ndarray, e_dim: int, seed: int) -> np.ndarray:
  """`[V, D]` -> `[V, e_dim]` by a fixed Gaussian random projection (identity when D == e_dim)."""
  if rows.shape[1] == e_dim:
    return rows.astype(np.float32)
  proj = np.random.default_rng([seed, 1]).normal(
    0.0, 1.0 / np.sqrt(e_dim), size=(rows.shape[1], e_dim)
  )
  return (rows @ proj).astype(np.float32)


def fixed_codes(config, embeddings: dict, fit: dict, scheme: str) -> tuple[dict, np.ndarray]:
  """hkmeans (clusters the images of `fit`) / atomic / random -> ({split: codes [N, L]},
  codebook [L*K, e_dim])."""
  tok = config.tokenizer
  k, levels, e_dim, seed = (
    int(tok.codebook_size),
    int(tok.num_levels),
    int(tok.e_dim),
    int(config.seed),
  )
  random_rows = np.random.default_rng([seed, 0]).normal(size=(levels * k, e_dim))
  all_ids = np.concatenate([d["image_ids"] for d in embeddings.values()])
  if scheme == "hkmeans":
    tree = hkmeans.fit(
      jax.random.key(seed),
      fit["image_emb"],
      fit["image_ids"],
      k,
      levels,
      iters=int(tok.kmeans_iters),
      init=str(tok.kmeans_init_method),
    )
    codes = {s: hkmeans.assign(tree, d["image_emb"]) for s, d in embeddings.items()}
    fill = np.random.default_rng([seed, 0]).normal(size=(levels * k, fit["image_emb"].shape[1]))
    rows = hkmeans.level_codebook(fit["image_emb"], hkmeans.assign(tree, fit["image_emb"]), k, fill)
    return codes, _project(rows, e_dim, seed)
  if scheme == "atomic":
    every = ids.atomic_codes(all_ids, k, levels)
  elif scheme == "random":
    every = ids.random_codes(all_ids, k, levels, seed)
  else:
    raise AssertionError(scheme)
  codes, start = {}, 0
  for split, data in embeddings.items():
    codes[split] = every[start : start + len(data["image_ids"])]
    start += len(data["image_ids"])
  return codes, random_rows.astype(np.float32)


# --- Identifiers and statistics ------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=1)
def _usage_stats(codes: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  # One program per split size: run op by op, these few lines were ~25 compiles per split.
  counts = quantizer.code_counts(codes, k)
  return quantizer.perplexity(counts), quantizer.unused_share(counts)


def _usage(codes: np.ndarray, k: int) -> tuple[list, list]:
  """`codes int[N, L]` -> (perplexity per level, unused share per level)."""
  perplexity, unused = _usage_stats(np.asarray(codes, np.int32), int(k))
  return np.asarray(perplexity).tolist(), np.asarray(unused).tolist()


def format_summary(scheme: str, summary: dict) -> str:
  lines = [
    f"tokenizer {scheme}: L={summary['num_levels']} K={summary['codebook_size']} "
    f"P={summary['id_length']} D={summary['disambiguation_size']} "
    f"(collision rate over all images {summary['collision_rate_all']:.4f})",
    "split | images | collision | perplexity per level | unused share per level | "
    "recon MSE | align MSE",
  ]
  for split, s in summary["splits"].items():
    lines.append(
      f"{split} | {s['images']} | {s['collision_rate']:.4f} | "
      f"{' '.join(f'{p:.1f}' for p in s['perplexity'])} | "
      f"{' '.join(f'{u:.3f}' for u in s['unused_share'])} | "
      # hkmeans / atomic / random have no reconstruction or alignment error: a dash.
      f"{format_metric(s.get('recon_mse'), '.5f')} | "
      f"{format_metric(s.get('align_mse'), '.5f')}"
    )
  if summary.get("semantic"):
    lines.append(f"semantic measure ({summary['semantic_split']} split):")
    lines.append(analysis.format_table({scheme: summary["semantic"]}))
  return "\n".join(lines)


def codes_and_codebook(
  config: ml_collections.ConfigDict,
  workdir: str,
  directory: str,
  embeddings: dict,
  fit: dict,
  scheme: str,
  name: str,
) -> tuple[dict, np.ndarray, dict, bool]:
  """`scheme`'s codes for every split -> `({split: codes [N, L]}, codebook, {split: stats},
  shared codebook)`."""
  if scheme in model_lib.RQ_SCHEMES:
    codes, codebook, stats = learned_codes(
      config, workdir, directory, embeddings, fit, scheme, name
    )
    return codes, codebook, stats, bool(config.tokenizer.shared_codebook)
  codes, codebook = fixed_codes(config, embeddings, fit, scheme)
  return codes, codebook, {s: {} for s in embeddings}, False


def identifiers(
  config: ml_collections.ConfigDict,
  embeddings: dict,
  codes: dict,
  codebook: np.ndarray,
  split_stats: dict,
  *,
  scheme: str,
  name: str,
  fit_on: str,
  shared: bool,
) -> tuple[VokenVocabulary, dict, dict]:
  """Unique identifiers from the codes (statistics taken before disambiguation) ->
  `(vocab, {split: (image_ids int64[N], identifiers int32[N, P])}, summary)`."""
  tok = config.tokenizer
  k, levels = int(tok.codebook_size), int(tok.num_levels)
  all_codes = np.concatenate([codes[s] for s in embeddings])
  summary: dict[str, Any] = dict(
    scheme=scheme,
    name=name,
    fit_on=fit_on,
    num_levels=levels,
    codebook_size=k,
    shared_codebook=shared,
    collision_rate_all=ids.collision_rate(all_codes),
    splits={},
  )
  for split in embeddings:
    perplexity, unused = _usage(codes[split], k)
    summary["splits"][split] = dict(
      images=len(codes[split]),
      collision_rate=ids.collision_rate(codes[split]),
      perplexity=perplexity,
      unused_share=unused,
      **split_stats[split],
    )

  if tok.disambiguation:
    per_split, disambiguation = ids.disambiguate_per_index(
      codes, {s: d["image_ids"] for s, d in embeddings.items()}
    )
    final = np.concatenate([per_split[s] for s in embeddings])
  else:
    final, disambiguation = all_codes.astype(np.int32), 0
    if summary["collision_rate_all"] > 0:
      log.warning(
        "tokenizer: %.2f%% of images share an identifier (tokenizer.disambiguation is off)",
        100 * summary["collision_rate_all"],
      )
  vocab = VokenVocabulary(
    text_vocab_size=int(config.t5.vocab_size),
    codebook_size=k,
    num_levels=levels,
    shared_codebook=shared,
    disambiguation_size=disambiguation,
  )
  final = vocab.validate_codes(final, f"{scheme} identifiers")
  if tok.disambiguation:
    start = 0
    for split, data in embeddings.items():  # unique within each index (split)
      n = len(data["image_ids"])
      ids.check_identifiers(
        final[start : start + n], vocab.position_sizes(), what=f"{scheme} identifiers of {split}"
      )
      start += n
  if codebook.shape != (vocab.num_level_tokens, int(tok.e_dim)):
    raise AssertionError(f"codebook {codebook.shape} != {(vocab.num_level_tokens, tok.e_dim)}")
  summary.update(id_length=vocab.id_length, disambiguation_size=disambiguation)

  table, start = {}, 0
  for split, data in embeddings.items():
    n = len(data["image_ids"])
    table[split] = (data["image_ids"], final[start : start + n])
    start += n
  return vocab, table, summary
