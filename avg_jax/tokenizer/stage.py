"""`avg-jax tokenize`: image embeddings -> unique voken identifiers for every image.

Reads `paths.embeddings_file(workdir, split)` (train required; val / test when present),
builds identifiers with `config.tokenizer.scheme` and writes to
`paths.tokenizer_dir(workdir, scheme)`:

    voken_table.npz   <split>_image_ids int64[N], <split>_codes int32[N, P] for each split
    vocab.json        VokenVocabulary.to_dict() (token layout, P, D)
    codebook.npy      float32[V_level_tokens, e_dim] initial voken embeddings, level-token order
    summary.json      per-split statistics (written last: its presence means "complete")
    fingerprint.json  the config + input hash the directory was made with
    checkpoints/      RQ-VAE train state (avg / rq) via orbax

Schemes: `avg` (RQ-VAE with caption alignment), `rq` (same without the alignment term),
`hkmeans` (hierarchical k-means of image embeddings), `atomic` and `random` (arbitrary ids;
see `ids.py`). The learned schemes use `tokenizer.shared_codebook`; the others always use
per-position tokens (a code means something different at each position). Codebook rows:
avg / rq: the trained codebook (e_dim wide already); hkmeans: per-level residual means of the
image embeddings (`hkmeans.level_codebook`), mapped to e_dim by a fixed Gaussian random
projection (entries N(0, 1/e_dim), seeded) when the embedding width differs; atomic / random:
N(0, 1) entries (T5's own embedding initialisation scale).

Which pairs the tokenizer is fit on depends on the protocol (`config.protocol`): the
training split's (image, caption) pairs, plus, for the transductive protocol with
`tokenizer.fit_on_pseudo_queries`, the (image, pseudo query) pairs of the indexed (val / test)
images (the reference's default; hkmeans then clusters those images too). Such a fit lives in
`tokenizer/<scheme>+pseudo`, a fit on training pairs alone in `tokenizer/<scheme>`
(`tokenizer_name`), so both protocols share a fit that does not depend on them.

Identifiers are made unique within each index -- each split -- by one disambiguation position
(`tokenizer.disambiguation`, `ids.disambiguate_per_index`): an image's identifier never depends
on images of other splits. D is the largest group over all images together, so that an index
made of several splits (an export) can be disambiguated with the same tokens. The collision
rate before disambiguation is reported per split.
Rerunning with the same config and embeddings does nothing; a directory made with another
config is an error (remove it, or use another workdir).
"""

import hashlib
import json
import logging
import os
import tempfile
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from avg_jax import config as config_lib
from avg_jax import partitioning, paths
from avg_jax.errors import UserError
from avg_jax.metrics import MetricsWriter
from avg_jax.progress import progress
from avg_jax.data import pseudo_queries as pseudo_lib
from avg_jax.tokenizer import analysis, hkmeans, ids, quantizer
from avg_jax.tokenizer import losses as losses_lib
from avg_jax.tokenizer import model as model_lib
from avg_jax.tokenizer import train as train_lib
from avg_jax.vokens import VokenVocabulary

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
VOKEN_TABLE = "voken_table.npz"
VOCAB = "vocab.json"
CODEBOOK = "codebook.npy"
SUMMARY = "summary.json"
FINGERPRINT = "fingerprint.json"
# Keys that change how the work is run or reported, not its result.
_OPERATIONAL_KEYS = ("checkpoint_every", "keep_checkpoints", "log_every", "assign_batch_size",
                     "analysis_split", "analysis_pairs", "fit_on_pseudo_queries")
# Schemes whose identifiers depend on what they are fit on.
FITTED_SCHEMES = ("avg", "rq", "hkmeans")
PSEUDO_SUFFIX = "+pseudo"


def fits_on_pseudo_queries(config: ml_collections.ConfigDict, scheme: str, protocol: str) -> bool:
  """Whether `scheme`'s tokenizer under `protocol` is fit on pseudo-query pairs too."""
  return (pseudo_lib.check_protocol(protocol) == "transductive" and scheme in FITTED_SCHEMES
          and bool(config.tokenizer.fit_on_pseudo_queries))


def tokenizer_name(config: ml_collections.ConfigDict, scheme: str, protocol: str) -> str:
  """The voken table a generator of `scheme` uses under `protocol` (a `tokenizer/` folder)."""
  return scheme + (PSEUDO_SUFFIX if fits_on_pseudo_queries(config, scheme, protocol) else "")


def voken_table_file(workdir: str, name: str) -> str:
  """`name`: a `tokenizer_name` (a scheme, or a scheme fit on pseudo queries too)."""
  return os.path.join(paths.tokenizer_dir(workdir, name), VOKEN_TABLE)


# --- Reading inputs and outputs --------------------------------------------------------------


def read_embeddings(workdir: str, split: str) -> Optional[dict]:
  """The embeddings-contract arrays of `split`, checked; None when the file does not exist."""
  path = paths.embeddings_file(workdir, split)
  if not os.path.exists(path):
    return None
  from avg_jax.encoders.stage import load_embeddings  # the embed stage's reader (contract)
  data = dict(load_embeddings(workdir, split))
  n, m = len(data["image_ids"]), len(data["caption_image_ids"])
  if data["image_emb"].ndim != 2 or len(data["image_emb"]) != n:
    raise UserError(f"{path}: image_emb must be [{n}, D], got {list(data['image_emb'].shape)}")
  if data["caption_emb"].shape != (m, data["image_emb"].shape[1]):
    raise UserError(f"{path}: caption_emb must be [{m}, {data['image_emb'].shape[1]}], "
                    f"got {list(data['caption_emb'].shape)}")
  if len(np.unique(data["image_ids"])) != n:
    raise UserError(f"{path}: image_ids are not unique")
  order = np.argsort(data["image_ids"])
  pos = np.searchsorted(data["image_ids"], data["caption_image_ids"], sorter=order)
  pos = np.minimum(pos, n - 1)
  index = order[pos] if n else pos
  if m and (n == 0 or (data["image_ids"][index] != data["caption_image_ids"]).any()):
    raise UserError(f"{path}: caption_image_ids name images that are not in image_ids")
  data["caption_image_index"] = index.astype(np.int64)
  data["image_ids"] = data["image_ids"].astype(np.int64)
  data["image_emb"] = data["image_emb"].astype(np.float32)
  data["caption_emb"] = data["caption_emb"].astype(np.float32)
  return data


def load_voken_table(workdir: str, name: str
                     ) -> tuple[VokenVocabulary, dict[str, tuple[np.ndarray, np.ndarray]],
                                np.ndarray]:
  """`(vocab, {split: (image_ids int64[N], codes int32[N, P])}, codebook [V, e_dim])` of the
  voken table `name` (a `tokenizer_name`)."""
  directory = paths.tokenizer_dir(workdir, name)
  if not os.path.exists(os.path.join(directory, SUMMARY)):
    scheme, pseudo = name.removesuffix(PSEUDO_SUFFIX), name.endswith(PSEUDO_SUFFIX)
    raise UserError(f"no complete voken table in {directory}; run `avg-jax tokenize` with "
                    f"--config.tokenizer.scheme={scheme}"
                    + (" --config.protocol=transductive" if pseudo else "") + " first")
  return _load_outputs(directory)


def _load_outputs(directory: str) -> tuple[VokenVocabulary, dict, np.ndarray]:
  with open(os.path.join(directory, VOCAB), encoding="utf-8") as f:
    vocab = VokenVocabulary.from_dict(json.load(f))
  table = {}
  with np.load(os.path.join(directory, VOKEN_TABLE)) as f:
    for key in f.files:
      if key.endswith("_image_ids"):
        split = key[:-len("_image_ids")]
        codes = vocab.validate_codes(f[f"{split}_codes"], f"{directory}/{VOKEN_TABLE} {split}")
        table[split] = (f[key].astype(np.int64), codes)
  codebook = np.load(os.path.join(directory, CODEBOOK))
  return vocab, table, codebook


def fit_pairs(embeddings: dict, pseudo: Optional[tuple[np.ndarray, np.ndarray]]) -> dict:
  """The (image, text) pairs a tokenizer is fit on.

  `embeddings`: `{split: read_embeddings(...)}`; `pseudo`: `(image ids int64[Q], query_emb
  [Q, D])` of the pseudo queries, or None. Returns `image_ids [N]`, `image_emb [N, D]`,
  `caption_emb [M, D]`, `caption_image_index [M]` and a `description`: the training split's
  images and captions, plus (with `pseudo`) the images of the other splits that have pseudo
  queries, paired with them.
  """
  train = embeddings["train"]
  fit = dict(image_ids=train["image_ids"], image_emb=train["image_emb"],
             caption_emb=train["caption_emb"], caption_image_index=train["caption_image_index"],
             description="train pairs")
  if pseudo is None:
    return fit
  pseudo_ids, pseudo_emb = pseudo
  indexed = [s for s in embeddings if s != "train"]
  image_ids = np.concatenate([train["image_ids"]] + [embeddings[s]["image_ids"] for s in indexed])
  keep = np.isin(pseudo_ids, image_ids) & ~np.isin(pseudo_ids, train["image_ids"])
  if pseudo_emb.shape[1:] != train["caption_emb"].shape[1:]:
    raise UserError(f"pseudo query embeddings are {pseudo_emb.shape[1]}-d, captions "
                    f"{train['caption_emb'].shape[1]}-d; rerun `avg-jax embed`")
  row_of = {int(i): r for r, i in enumerate(image_ids)}
  index = np.asarray([row_of[int(i)] for i in pseudo_ids[keep]], np.int64)
  return dict(
      image_ids=image_ids,
      image_emb=np.concatenate([train["image_emb"]] + [embeddings[s]["image_emb"] for s in indexed]),
      caption_emb=np.concatenate([train["caption_emb"], pseudo_emb[keep]]),
      caption_image_index=np.concatenate([train["caption_image_index"], index]),
      description=f"train pairs + {int(keep.sum())} pseudo-query pairs of "
                  f"{'/'.join(indexed)} images")


# --- Writing ---------------------------------------------------------------------------------


def _atomic_write(path: str, write) -> None:
  """Calls `write(file_object)` on a temporary file next to `path`, then renames it."""
  directory = os.path.dirname(path)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _write_json(path: str, value: Any) -> None:
  _atomic_write(path, lambda f: f.write(json.dumps(value, indent=1).encode()))


def _fingerprint(config: ml_collections.ConfigDict, embeddings: dict, fit: dict) -> dict:
  tok = {k: v for k, v in config_lib.to_json_dict(config.tokenizer).items()
         if k not in _OPERATIONAL_KEYS}
  digest = hashlib.blake2b(digest_size=16)
  for split in sorted(embeddings):
    for key in ("image_ids", "image_emb", "caption_image_ids", "caption_emb"):
      digest.update(np.ascontiguousarray(embeddings[split][key]).tobytes())
  for key in ("image_emb", "caption_emb", "caption_image_index"):
    digest.update(np.ascontiguousarray(fit[key]).tobytes())
  fingerprint = dict(tokenizer=tok, seed=int(config.seed),
                     text_vocab_size=int(config.t5.vocab_size), embeddings=digest.hexdigest(),
                     fit_on=fit["description"])
  return json.loads(json.dumps(fingerprint))  # tuples -> lists, as it reads back from disk


def _check_fingerprint(directory: str, fingerprint: dict) -> bool:
  """True when `directory` is complete for `fingerprint`; raises when made by another one."""
  path = os.path.join(directory, FINGERPRINT)
  if not os.path.exists(path):
    return False
  with open(path, encoding="utf-8") as f:
    stored = json.load(f)
  if stored != fingerprint:
    diffs = [f"tokenizer.{k}: {stored['tokenizer'].get(k)!r} -> {v!r}"
             for k, v in fingerprint["tokenizer"].items()
             if stored.get("tokenizer", {}).get(k) != v]
    for k in ("seed", "text_vocab_size", "embeddings", "fit_on"):
      if stored.get(k) != fingerprint[k]:
        diffs.append(f"{k} changed")
    raise UserError(f"{directory} was made with a different config or embeddings "
                    f"({'; '.join(diffs) or 'fingerprint differs'}); remove it or use another "
                    f"workdir")
  if not os.path.exists(os.path.join(directory, SUMMARY)):
    return False
  try:  # complete only if every output still loads (a damaged file is redone)
    with open(os.path.join(directory, SUMMARY), encoding="utf-8") as f:
      json.load(f)
    _load_outputs(directory)
  except Exception as e:  # numpy / json / zip errors of damaged files have many types
    log.warning("tokenizer: %s has a damaged output (%s: %s); redoing it", directory,
                type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
    return False
  return True


# --- Identifier schemes ----------------------------------------------------------------------


def _train_rqvae(config, workdir: str, directory: str, embeddings: dict, fit: dict, scheme: str,
                 name: str) -> tuple[dict, np.ndarray, dict]:
  """Trains (or resumes) the RQ-VAE on the pairs of `fit` (see `fit_pairs`);
  -> ({split: codes [N, L]}, codebook, {split: stats})."""
  tok = config.tokenizer
  cfg = model_lib.RQVAEConfig.from_config(tok, in_dim=fit["image_emb"].shape[1])
  weights = losses_lib.LossWeights.from_config(tok, scheme)
  if weights.align_position == "latent" and weights.align and cfg.e_dim != cfg.in_dim:
    raise UserError(f"tokenizer.align_position='latent' needs tokenizer.e_dim={cfg.in_dim} "
                    f"(the embedding width), got {cfg.e_dim}")
  trainer = train_lib.RQVAETrainer(cfg, weights, partitioning.make_mesh(config.mesh),
                                   train_lib.TrainOptions.from_config(tok, config.seed),
                                   int(tok.batch_size))
  sampler = train_lib.PairSampler(fit["image_emb"], fit["caption_emb"],
                                  fit["caption_image_index"], int(tok.batch_size),
                                  seed=int(config.seed))
  state = _fit(trainer, sampler, tok, workdir, directory, name)

  codes, stats = {}, {}
  for split, data in embeddings.items():
    split_codes, decoded, latent = trainer.encode_images(
        state, data["image_emb"], batch_size=int(tok.assign_batch_size), desc=f"assign {split}")
    codes[split] = split_codes
    aligned = decoded if weights.align_position == "decoder" else latent
    recon = float(np.mean(np.square(decoded - data["image_emb"])))
    align = (float(np.mean(np.square(aligned[data["caption_image_index"]] - data["caption_emb"])))
             if aligned.shape[1] == data["caption_emb"].shape[1] else float("nan"))
    stats[split] = dict(recon_mse=recon, align_mse=align)
  books = np.asarray(jax.device_get(state.params["codebooks"]), np.float32)
  return codes, books.reshape(-1, cfg.e_dim), stats


def _fit(trainer: train_lib.RQVAETrainer, sampler: train_lib.PairSampler, tok, workdir: str,
         directory: str, name: str) -> train_lib.TokenizerState:
  """The training loop: resume from the newest good checkpoint or init + k-means, then train.

  Checkpoints go through `training.checkpointing.Checkpointer`, as in the train and rank
  stages: a damaged newest checkpoint is reported and the previous one used. Batches are a
  function of the step (`sampler.batch(step)`), so no iterator state is saved.
  """
  from avg_jax.training.checkpointing import Checkpointer  # heavy (orbax, grain)

  checkpointer = Checkpointer(os.path.join(directory, "checkpoints"),
                              keep=int(tok.keep_checkpoints), async_save=False)
  found = checkpointer.restore_latest_good(trainer.abstract_state)
  if found is not None:
    state = found[1]
    log.info("tokenizer: resumed from %s at step %d", directory, int(state.step))
  else:
    state = trainer.init_state()
    if tok.kmeans_init:
      t0 = time.time()
      first = np.concatenate([sampler.batch(s)[0] for s in range(int(tok.kmeans_init_batches))])
      state = trainer.kmeans_init(state, first)
      jax.block_until_ready(state.params["codebooks"])
      log.info("tokenizer: k-means init on %d encoder outputs in %.1fs",
               len(first) * jax.process_count(), time.time() - t0)

  writer = MetricsWriter(workdir, "tokenize", process_index=jax.process_index())
  meta = {"stage": "tokenize", "scheme": name}
  steps, start = int(tok.steps), int(state.step)
  log_every, ckpt_every = max(1, int(tok.log_every)), max(1, int(tok.checkpoint_every))
  t0, last_logged = time.time(), start
  for step in progress(range(start, steps), total=steps - start, desc=f"tokenize {name}"):
    state, metrics = trainer.train_step(state, *sampler.batch(step))
    done = step + 1
    if done % log_every == 0 or done == steps:
      metrics = jax.tree.map(np.asarray, metrics)   # the only host sync in the loop
      elapsed = time.time() - t0
      writer.write(method=name, step=done, split="train",
                   examples_per_s=(done - last_logged) * sampler.batch_size / max(elapsed, 1e-9),
                   **metrics)
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
  proj = np.random.default_rng([seed, 1]).normal(0.0, 1.0 / np.sqrt(e_dim),
                                                 size=(rows.shape[1], e_dim))
  return (rows @ proj).astype(np.float32)


def _fixed_scheme(config, embeddings: dict, fit: dict, scheme: str) -> tuple[dict, np.ndarray]:
  """hkmeans (clusters the images of `fit`) / atomic / random -> ({split: codes [N, L]},
  codebook [L*K, e_dim])."""
  tok = config.tokenizer
  k, levels, e_dim, seed = (int(tok.codebook_size), int(tok.num_levels), int(tok.e_dim),
                            int(config.seed))
  random_rows = np.random.default_rng([seed, 0]).normal(size=(levels * k, e_dim))
  all_ids = np.concatenate([d["image_ids"] for d in embeddings.values()])
  if scheme == "hkmeans":
    tree = hkmeans.fit(jax.random.key(seed), fit["image_emb"], fit["image_ids"], k, levels,
                       iters=int(tok.kmeans_iters), init=str(tok.kmeans_init_method))
    codes = {s: hkmeans.assign(tree, d["image_emb"]) for s, d in embeddings.items()}
    fill = np.random.default_rng([seed, 0]).normal(size=(levels * k, fit["image_emb"].shape[1]))
    rows = hkmeans.level_codebook(fit["image_emb"], hkmeans.assign(tree, fit["image_emb"]), k,
                                  fill)
    return codes, _project(rows, e_dim, seed)
  if scheme == "atomic":
    every = ids.atomic_codes(all_ids, k, levels)
  elif scheme == "random":
    every = ids.random_codes(all_ids, k, levels, seed)
  else:
    raise AssertionError(scheme)
  codes, start = {}, 0
  for split, data in embeddings.items():
    codes[split] = every[start:start + len(data["image_ids"])]
    start += len(data["image_ids"])
  return codes, random_rows.astype(np.float32)


# --- The stage -------------------------------------------------------------------------------


def _usage(codes: np.ndarray, k: int) -> tuple[list, list]:
  counts = quantizer.code_counts(codes, k)
  return (np.asarray(quantizer.perplexity(counts)).tolist(),
          np.asarray(quantizer.unused_share(counts)).tolist())


def _format_summary(scheme: str, summary: dict) -> str:
  lines = [f"tokenizer {scheme}: L={summary['num_levels']} K={summary['codebook_size']} "
           f"P={summary['id_length']} D={summary['disambiguation_size']} "
           f"(collision rate over all images {summary['collision_rate_all']:.4f})",
           "split | images | collision | perplexity per level | unused share per level | "
           "recon MSE | align MSE"]
  for split, s in summary["splits"].items():
    lines.append(
        f"{split} | {s['images']} | {s['collision_rate']:.4f} | "
        f"{' '.join(f'{p:.1f}' for p in s['perplexity'])} | "
        f"{' '.join(f'{u:.3f}' for u in s['unused_share'])} | "
        f"{s.get('recon_mse', float('nan')):.5f} | {s.get('align_mse', float('nan')):.5f}")
  if summary.get("semantic"):
    lines.append(f"semantic measure ({summary['semantic_split']} split):")
    lines.append(analysis.format_table({scheme: summary["semantic"]}))
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Builds and writes the voken table of `config.tokenizer.scheme` for `config.protocol`
  (see module doc)."""
  tok = config.tokenizer
  scheme = str(tok.scheme)
  if scheme not in model_lib.SCHEMES:
    raise UserError(f"config key tokenizer.scheme must be one of {', '.join(model_lib.SCHEMES)}, "
                    f"got {scheme!r}")
  protocol = pseudo_lib.check_protocol(str(config.protocol))
  embeddings = {}
  for split in SPLITS:
    data = read_embeddings(workdir, split)
    if data is not None:
      embeddings[split] = data
  if "train" not in embeddings:
    raise UserError(f"{paths.embeddings_file(workdir, 'train')} not found; run `avg-jax embed` "
                    f"first")
  all_ids = np.concatenate([d["image_ids"] for d in embeddings.values()])
  if len(np.unique(all_ids)) != len(all_ids):
    raise UserError(f"image ids repeat across the splits' embeddings in {paths.embed_dir(workdir)}")

  name = tokenizer_name(config, scheme, protocol)
  pseudo = None
  if fits_on_pseudo_queries(config, scheme, protocol):
    from avg_jax.encoders.stage import load_pseudo_query_embeddings  # the embed stage's reader
    pseudo = load_pseudo_query_embeddings(workdir)
  fit = fit_pairs(embeddings, pseudo)
  directory = paths.tokenizer_dir(workdir, name)
  fingerprint = _fingerprint(config, embeddings, fit)
  is_main = jax.process_index() == 0
  if _check_fingerprint(directory, fingerprint):
    print(f"tokenize [{name}]: {directory} is complete for this config; kept")
    with open(os.path.join(directory, SUMMARY), encoding="utf-8") as f:
      print(_format_summary(name, json.load(f)))
    return
  if is_main:
    os.makedirs(directory, exist_ok=True)
    _write_json(os.path.join(directory, FINGERPRINT), fingerprint)

  k, levels = int(tok.codebook_size), int(tok.num_levels)
  if scheme in model_lib.RQ_SCHEMES:
    codes, codebook, split_stats = _train_rqvae(config, workdir, directory, embeddings, fit,
                                                scheme, name)
    shared = bool(tok.shared_codebook)
  else:
    codes, codebook = _fixed_scheme(config, embeddings, fit, scheme)
    split_stats, shared = {s: {} for s in embeddings}, False

  # Statistics before disambiguation.
  all_codes = np.concatenate([codes[s] for s in embeddings])
  summary = dict(scheme=scheme, name=name, fit_on=fit["description"], num_levels=levels,
                 codebook_size=k, shared_codebook=shared,
                 collision_rate_all=ids.collision_rate(all_codes), splits={})
  for split in embeddings:
    perplexity, unused = _usage(codes[split], k)
    summary["splits"][split] = dict(images=len(codes[split]),
                                    collision_rate=ids.collision_rate(codes[split]),
                                    perplexity=perplexity, unused_share=unused,
                                    **split_stats[split])

  if tok.disambiguation:
    per_split, disambiguation = ids.disambiguate_per_index(
        codes, {s: d["image_ids"] for s, d in embeddings.items()})
    final = np.concatenate([per_split[s] for s in embeddings])
  else:
    final, disambiguation = all_codes.astype(np.int32), 0
    if summary["collision_rate_all"] > 0:
      log.warning("tokenizer: %.2f%% of images share an identifier (tokenizer.disambiguation "
                  "is off)", 100 * summary["collision_rate_all"])
  vocab = VokenVocabulary(text_vocab_size=int(config.t5.vocab_size), codebook_size=k,
                          num_levels=levels, shared_codebook=shared,
                          disambiguation_size=disambiguation)
  final = vocab.validate_codes(final, f"{scheme} identifiers")
  if tok.disambiguation:
    start = 0
    for split, data in embeddings.items():  # unique within each index (split)
      n = len(data["image_ids"])
      ids.check_identifiers(final[start:start + n], vocab.position_sizes(),
                            what=f"{scheme} identifiers of {split}")
      start += n
  if codebook.shape != (vocab.num_level_tokens, int(tok.e_dim)):
    raise AssertionError(f"codebook {codebook.shape} != {(vocab.num_level_tokens, tok.e_dim)}")
  summary.update(id_length=vocab.id_length, disambiguation_size=disambiguation)

  table, start = {}, 0
  for split, data in embeddings.items():
    n = len(data["image_ids"])
    table[f"{split}_image_ids"] = data["image_ids"]
    table[f"{split}_codes"] = final[start:start + n]
    start += n

  analysis_split = str(tok.analysis_split)
  if analysis_split in embeddings:
    features = analysis.load_features(workdir, analysis_split,
                                      embeddings[analysis_split]["image_ids"])
    if features is not None:
      summary["semantic_split"] = analysis_split
      summary["semantic"] = analysis.semantic_similarity(
          table[f"{analysis_split}_codes"], features, num_pairs=int(tok.analysis_pairs),
          seed=int(config.seed))

  writer = MetricsWriter(workdir, "tokenize", process_index=jax.process_index())
  for split, s in summary["splits"].items():
    writer.write(method=name, split=split, disambiguation_size=disambiguation,
                 id_length=vocab.id_length, **s)
  if summary.get("semantic"):
    writer.write(method=name, split=summary["semantic_split"],
                 semantic=summary["semantic"])
  if is_main:
    _atomic_write(os.path.join(directory, VOKEN_TABLE), lambda f: np.savez(f, **table))
    _atomic_write(os.path.join(directory, CODEBOOK),
                  lambda f: np.save(f, codebook.astype(np.float32)))
    _write_json(os.path.join(directory, VOCAB), vocab.to_dict())
    _write_json(os.path.join(directory, SUMMARY), summary)  # last: marks the directory complete
  print(_format_summary(name, summary))
