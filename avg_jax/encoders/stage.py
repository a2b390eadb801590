"""`avg-jax embed`: the dual encoder, per-split embeddings and the two-tower baseline.

    <workdir>/embed/fingerprint.json        config that made this directory (checked on reruns)
    <workdir>/embed/checkpoints/            train state + data iterator while training (removed
                                            once the encoder is saved)
    <workdir>/embed/encoder/                orbax checkpoint of the encoder parameters
    <workdir>/embed/encoder.json            ClipConfig, preprocessing, text tokenizer (written
                                            last: marks the encoder complete)
    <workdir>/embed/clip_tokenizer/         a pretrained CLIP's vocab.json / merges.txt copy
    <workdir>/embed/embeddings_<split>.npz  image_ids int64[N], image_emb float32[N, D],
                                            caption_image_ids int64[M], caption_emb float32[M, D]
                                            (not normalised; captions in caption_source order)
    <workdir>/embed/shards/                 rows being extracted, one .npz per shard (removed
                                            once merged into embeddings_<split>.npz)
    <workdir>/embed/pseudo_queries.npz      image_ids int64[Q], query_emb float32[Q, D]: the
                                            prepared pseudo queries of the val / test images
                                            (avg_jax.data.pseudo_queries), file order, embedded
                                            by the text tower; only when a tokenizer fit needs
                                            them (`pseudo_queries_needed`)

The encoder is imported from `encoder.pretrained_path` (a Hugging Face CLIP directory) when set,
otherwise trained from scratch (on all processes together). Feature extraction is then split
into shards that each process embeds on its own devices (avg_jax.encoders.extract); process 0
merges them. Finished outputs (embedding files, and shards of an interrupted run) are kept on
reruns.
"""

import dataclasses
import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn

from avg_jax import config as config_lib
from avg_jax import paths, partitioning
from avg_jax.data import dataset
from avg_jax.data import pseudo_queries as pseudo_lib
from avg_jax.data import shards as shards_lib
from avg_jax.data.text_tokenizer import TextTokenizer
from avg_jax.encoders import bpe, clip, extract, hf_import, preprocess, retrieval
from avg_jax.encoders.train import train_encoder
from avg_jax.errors import UserError
from avg_jax.evaluation.recall import recall_at_k
from avg_jax.metrics import MetricsWriter, read_metrics

log = logging.getLogger(__name__)

EMBEDDING_KEYS = extract.EMBEDDING_KEYS
# Settings that change how, not what, is computed: left out of the fingerprint.
_OPERATIONAL_KEYS = ("embed_batch_size", "embed_images_per_shard", "log_every",
                     "checkpoint_every", "query_batch_size", "retrieval_chunk_size")


# --- Reading outputs --------------------------------------------------------------------------


def load_embeddings(workdir: str, split: str) -> dict:
  """The embeddings of `split`: `image_ids int64[N]`, `image_emb float32[N, D]`,
  `caption_image_ids int64[M]`, `caption_emb float32[M, D]` (raises `UserError` if absent)."""
  path = paths.embeddings_file(workdir, split)
  if not os.path.exists(path):
    raise UserError(f"{path} not found; run `avg-jax embed` first")
  try:
    with np.load(path) as f:
      data = {k: f[k] for k in EMBEDDING_KEYS}
  except KeyError as e:
    raise UserError(f"{path}: missing array {e.args[0]}") from e
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: cannot read ({e})") from e
  return data


def pseudo_query_file(workdir: str) -> str:
  return os.path.join(paths.embed_dir(workdir), "pseudo_queries.npz")


def load_pseudo_query_embeddings(workdir: str) -> tuple[np.ndarray, np.ndarray]:
  """`(image ids int64[Q], query_emb float32[Q, D])` of the prepared pseudo queries."""
  path = pseudo_query_file(workdir)
  if not os.path.exists(path):
    raise UserError(f"{path} not found; run `avg-jax embed` first (with the same config: it "
                    f"embeds pseudo queries when tokenizer.fit_on_pseudo_queries is on)")
  try:
    with np.load(path) as f:
      return f["image_ids"].astype(np.int64), f["query_emb"].astype(np.float32)
  except (KeyError, OSError, ValueError) as e:
    raise UserError(f"{path}: cannot read ({e}); delete it and rerun `avg-jax embed`") from e


def pseudo_queries_needed(config: ml_collections.ConfigDict) -> bool:
  """Their only reader is a tokenizer fit on pseudo-query pairs (transductive protocol)."""
  protocols = {str(config.protocol), *(str(p) for p in config.evaluate.protocols)}
  return bool(config.tokenizer.fit_on_pseudo_queries) and "transductive" in protocols


def _embed_pseudo_queries(config: ml_collections.ConfigDict, workdir: str,
                          encoder: extract.DualEncoder, mesh) -> None:
  """Writes `pseudo_queries.npz` for the indexed (non-training) images' pseudo queries
  (every process computes, process 0 writes)."""
  train_ids = dataset.read_texts(workdir, "train")[0]
  image_ids, queries = pseudo_lib.load(workdir)
  keep = ~np.isin(image_ids, train_ids)
  image_ids, queries = image_ids[keep], [q for q, k in zip(queries, keep) if k]
  emb = encoder.encode_text_batches(queries, mesh, int(config.encoder_train.embed_batch_size),
                                    desc="embed pseudo queries")
  if jax.process_index() == 0:
    path = pseudo_query_file(workdir)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, image_ids=image_ids, query_emb=emb)
    os.replace(tmp, path)
    log.info("embed: wrote %s (%d pseudo queries)", path, len(queries))
  shards_lib.barrier("embed: pseudo queries written")


def encoder_files(workdir: str) -> tuple[str, str]:
  """(params checkpoint directory, encoder.json)."""
  directory = paths.embed_dir(workdir)
  return os.path.join(directory, "encoder"), os.path.join(directory, "encoder.json")


def load_encoder(workdir: str, mesh=None) -> extract.DualEncoder:
  """The saved dual encoder, parameters placed (sharded) on `mesh` (default: all devices)."""
  return load_encoder_dir(paths.embed_dir(workdir), mesh, stage_hint="run `avg-jax embed` first")


def load_encoder_dir(directory: str, mesh=None, *,
                     stage_hint: str = "") -> extract.DualEncoder:
  """A dual encoder saved in `directory` (`encoder/`, `encoder.json`, its text tokenizer at
  the path encoder.json names relative to `directory`): the embed stage's, or a copy made by
  `copy_encoder`. Damaged or missing files are `UserError`s naming them."""
  params_dir = os.path.join(directory, "encoder")
  meta_file = os.path.join(directory, "encoder.json")
  hint = f"; {stage_hint}" if stage_hint else ""
  if not os.path.exists(meta_file):
    raise UserError(f"{meta_file} not found{hint}")
  try:
    with open(meta_file, encoding="utf-8") as f:
      meta = json.load(f)
    cfg = clip.ClipConfig.from_dict(meta["clip"])
    pre = preprocess.PreprocessConfig.from_dict(meta["preprocess"])
  except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
    raise UserError(f"{meta_file}: unreadable ({type(e).__name__}: {e}){hint}") from e
  mesh = mesh if mesh is not None else partitioning.make_mesh({"data": -1})
  shardings = param_shardings(cfg, mesh)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          nn.unbox(_abstract_params(cfg)), shardings)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      params = checkpointer.restore(os.path.abspath(params_dir), abstract)
  except Exception as e:  # orbax raises many types for missing / damaged checkpoints
    raise UserError(f"{params_dir}: cannot restore the dual encoder ({type(e).__name__})"
                    f"{hint}") from e
  return extract.DualEncoder(cfg, params, pre, _load_tokenizer(meta["tokenizer"], directory),
                             shardings)


def copy_encoder(workdir: str, target: str) -> None:
  """Copies the embed stage's dual encoder into `target` as a self-contained folder that
  `load_encoder_dir(target)` reads (the text tokenizer copied in, encoder.json pointing at it)."""
  source = paths.embed_dir(workdir)
  params_dir, meta_file = encoder_files(workdir)
  if not os.path.exists(meta_file):
    raise UserError(f"{meta_file} not found; run `avg-jax embed` first")
  with open(meta_file, encoding="utf-8") as f:
    meta = json.load(f)
  os.makedirs(target, exist_ok=True)
  shutil.copytree(params_dir, os.path.join(target, "encoder"))
  spec = dict(meta["tokenizer"])
  tokenizer_path = os.path.join(source, spec["path"])
  local = "clip_tokenizer" if spec["kind"] == "clip_bpe" else "text_tokenizer.model"
  if os.path.isdir(tokenizer_path):
    shutil.copytree(tokenizer_path, os.path.join(target, local))
  else:
    shutil.copyfile(tokenizer_path, os.path.join(target, local))
  meta["tokenizer"] = dict(spec, path=local)
  _write_json(os.path.join(target, "encoder.json"), meta)


# --- The encoder ------------------------------------------------------------------------------


def _abstract_params(cfg: clip.ClipConfig) -> Any:
  return jax.eval_shape(clip.init_fn(cfg), jax.random.key(0))["params"]


def param_shardings(cfg: clip.ClipConfig, mesh) -> Any:
  """`NamedSharding` per parameter, from the model's logical annotations."""
  return partitioning.logical_to_sharding(nn.get_partition_spec(_abstract_params(cfg)), mesh)


def _place(params: Any, shardings: Any) -> Any:
  """Host (numpy) params -> global arrays; works with several processes too."""
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
      params, shardings)


def _load_tokenizer(spec: dict, directory: str) -> Any:
  path = os.path.join(directory, spec["path"])
  if spec["kind"] == "clip_bpe":
    return bpe.ClipBpeTokenizer.load(path)
  return TextTokenizer.load(path)


def _fingerprint(config: ml_collections.ConfigDict, info: dict) -> dict:
  train = {k: v for k, v in config_lib.to_json_dict(config.encoder_train).items()
           if k not in _OPERATIONAL_KEYS}
  encoder = {k: v for k, v in config_lib.to_json_dict(config.encoder).items() if k != "remat"}
  fingerprint = dict(encoder=encoder, seed=int(config.seed), data=info.get("config_hash", ""))
  if not config.encoder.pretrained_path:
    fingerprint["encoder_train"] = train
  return json.loads(json.dumps(fingerprint))


def _check_fingerprint(directory: str, fingerprint: dict) -> None:
  path = os.path.join(directory, "fingerprint.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      stored = json.load(f)
    if stored != fingerprint:
      diffs = [f"{section}.{k}" for section in ("encoder", "encoder_train")
               for k in set(stored.get(section, {})) | set(fingerprint.get(section, {}))
               if stored.get(section, {}).get(k) != fingerprint.get(section, {}).get(k)]
      diffs += [k for k in ("seed", "data") if stored.get(k) != fingerprint.get(k)]
      changed = ", ".join(sorted(diffs)) or "fingerprint"
      raise UserError(f"{directory} was made with a different config ({changed} changed); "
                      "remove it or use another workdir")
  elif jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
    _write_json(path, fingerprint)


def _write_json(path: str, value: Any) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def _build_encoder(config: ml_collections.ConfigDict, workdir: str, mesh) -> extract.DualEncoder:
  """Imports or trains the encoder and saves it (params, then encoder.json)."""
  directory = paths.embed_dir(workdir)
  params_dir, meta_file = encoder_files(workdir)
  pretrained = str(config.encoder.pretrained_path)
  if pretrained:
    tokenizer = bpe.ClipBpeTokenizer.load(pretrained)
    cfg, host_params = hf_import.load_hf_clip(pretrained, dtype=str(config.encoder.dtype),
                                              pad_token_id=tokenizer.pad_id)
    if bool(config.encoder.remat) != cfg.remat:
      cfg = clip.ClipConfig.from_dict(dict(cfg.to_dict(), remat=bool(config.encoder.remat)))
    pre = preprocess.PreprocessConfig.from_hf_dir(pretrained, cfg.image_size)
    shardings = param_shardings(cfg, mesh)
    params = _place(host_params, shardings)
    tokenizer_spec = {"kind": "clip_bpe", "path": "clip_tokenizer"}
    if jax.process_index() == 0:
      target = os.path.join(directory, "clip_tokenizer")
      os.makedirs(target, exist_ok=True)
      for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        if os.path.exists(os.path.join(pretrained, name)):
          shutil.copyfile(os.path.join(pretrained, name), os.path.join(target, name))
    log.info("embed: imported CLIP from %s (%s)", pretrained, _describe(cfg))
  else:
    tokenizer_file = paths.text_tokenizer_model(workdir)
    tokenizer = TextTokenizer.load(tokenizer_file)
    cfg, params = train_encoder(config, workdir, mesh, tokenizer)
    pre = preprocess.PreprocessConfig.for_image_size(cfg.image_size)
    shardings = param_shardings(cfg, mesh)
    tokenizer_spec = {"kind": "sentencepiece",
                      "path": os.path.relpath(tokenizer_file, directory)}
  with ocp.StandardCheckpointer() as checkpointer:
    # force: replaces a save left by an interrupted run (it has no encoder.json yet).
    checkpointer.save(os.path.abspath(params_dir), params, force=True)
    checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    _write_json(meta_file, {"clip": cfg.to_dict(), "preprocess": pre.to_dict(),
                            "tokenizer": tokenizer_spec, "pretrained_path": pretrained})
    # The train state's only use was resuming; the encoder is now saved on its own.
    shutil.rmtree(os.path.join(directory, "checkpoints"), ignore_errors=True)
  return extract.DualEncoder(cfg, params, pre, tokenizer, shardings)


def _describe(cfg: clip.ClipConfig) -> str:
  return (f"ViT {cfg.vision_layers}x{cfg.vision_width} /{cfg.patch_size} @{cfg.image_size}, "
          f"text {cfg.text_layers}x{cfg.text_width}, projection {cfg.projection_dim}")


# --- Evaluation -------------------------------------------------------------------------------


def two_tower_recall(embeddings: dict, ks, mesh, *, query_batch: int = 1024,
                     chunk_size: int = 65536) -> dict:
  """Recall@K (percent) of caption -> image cosine retrieval over one split's embeddings,
  plus `queries_per_s` of the search and `_ranked_ids int64[Q, K]` (the ranking itself)."""
  ks = tuple(int(k) for k in ks)
  image_ids = np.asarray(embeddings["image_ids"])
  k = min(max(ks), len(image_ids))
  index = retrieval.BruteForceIndex(embeddings["image_emb"], mesh=mesh, chunk_size=chunk_size)
  queries = np.asarray(embeddings["caption_emb"], np.float32)
  batches = [queries[i:i + query_batch] for i in range(0, len(queries), query_batch)]
  for batch in {len(b): b for b in batches}.values():
    index.search(batch, k)  # compile every batch shape outside the timed region
  t0 = time.perf_counter()
  ranked = [index.search(batch, k)[1] for batch in batches]
  elapsed = time.perf_counter() - t0
  ranked_ids = image_ids[np.concatenate(ranked)]
  if k < max(ks):  # fewer images than the largest K: pad with "no result"
    ranked_ids = np.pad(ranked_ids, ((0, 0), (0, max(ks) - k)), constant_values=-1)
  metrics = recall_at_k(ranked_ids, embeddings["caption_image_ids"], ks)
  metrics["queries_per_s"] = len(queries) / max(elapsed, 1e-9)
  metrics["_ranked_ids"] = ranked_ids
  return metrics


def _already_evaluated(workdir: str) -> bool:
  return any(r.get("stage") == "embed" and r.get("method") == "two_tower"
             and r.get("split") == "test" for r in read_metrics(workdir))


# --- The stage --------------------------------------------------------------------------------


def local_encoder(encoder: extract.DualEncoder,
                  mesh_config: Any) -> tuple[extract.DualEncoder, Any]:
  """(the encoder on this process's devices only, their mesh): feature extraction needs
  nothing from other processes. The mesh follows `mesh_config` over the local devices."""
  try:
    mesh = partitioning.make_mesh(mesh_config, jax.local_devices())
  except UserError as e:
    raise UserError(f"embed extracts features on each process's {jax.local_device_count()} "
                    f"devices, config {e}") from e
  shardings = param_shardings(encoder.cfg, mesh)
  if jax.process_count() == 1:
    params = jax.device_put(encoder.params, shardings)
  else:
    # Parameters may be split over processes (fsdp / model axes): every process gathers a
    # whole copy on the host (one model's memory), then places it on its own devices.
    from jax.experimental import multihost_utils
    params = _place(multihost_utils.process_allgather(encoder.params, tiled=True), shardings)
  return dataclasses.replace(encoder, params=params, param_shardings=shardings, _jitted={}), mesh


def _extract(config: ml_collections.ConfigDict, workdir: str, encoder: extract.DualEncoder,
             splits: list[str], fresh: bool) -> None:
  """Writes `embeddings_<split>.npz` of `splits`: every process its shards, then process 0
  merges them (the others wait, see avg_jax.data.shards)."""
  index, count = jax.process_index(), jax.process_count()
  shards_dir = paths.embed_shards_dir(workdir)
  if fresh:  # shards left by an earlier encoder hold its rows, not this one's
    if index == 0:
      shutil.rmtree(shards_dir, ignore_errors=True)
    shards_lib.barrier("embed: stale shards removed")
  t0 = time.perf_counter()
  mine, mesh = local_encoder(encoder, config.mesh)
  counts = extract.write_shards(mine, workdir, splits, mesh, config, index, count)
  # A collective: once it returns, every process has written its shards.
  totals = shards_lib.sum_over_processes(np.array([counts[s] for s in splits]))
  error = None
  if index == 0:
    try:
      for split in splits:
        path = extract.merge_shards(workdir, split, config, encoder.cfg.projection_dim)
        log.info("embed: wrote %s", path)
      shutil.rmtree(shards_dir, ignore_errors=True)
    except Exception as e:  # pylint: disable=broad-except (re-raised below, after telling
      error = e             # the other processes, which would otherwise wait forever)
  if not shards_lib.process_0_succeeded(error is None):
    if error is not None:
      raise error
    raise UserError("embed: merging the shards failed in process 0 (see its error)")
  writer = MetricsWriter(workdir, "embed", process_index=index)
  for split, (total, skipped, written) in zip(splits, totals.tolist()):
    writer.write(split=split, shards=total, shards_skipped=skipped, shards_written=written,
                 processes=count, seconds=round(time.perf_counter() - t0, 3))


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Builds or loads the encoder, writes missing embeddings, reports two-tower Recall@K."""
  info = dataset.load_info(workdir)
  directory = paths.embed_dir(workdir)
  _check_fingerprint(directory, _fingerprint(config, info))
  mesh = partitioning.make_mesh(config.mesh)
  _, meta_file = encoder_files(workdir)
  fresh = not os.path.exists(meta_file)
  t0 = time.perf_counter()
  encoder = _build_encoder(config, workdir, mesh) if fresh else load_encoder(workdir, mesh)
  log.info("embed: encoder %s in %.1f s (%s)", "built" if fresh else "loaded",
           time.perf_counter() - t0, _describe(encoder.cfg))
  todo = []
  for split in info["splits"]:
    path = paths.embeddings_file(workdir, split)
    if os.path.exists(path) and not fresh:
      log.info("embed: keeping %s", path)
    else:
      todo.append(split)
  if todo:
    _extract(config, workdir, encoder, todo, fresh)
  if pseudo_queries_needed(config) and (todo or not os.path.exists(pseudo_query_file(workdir))):
    _embed_pseudo_queries(config, workdir, encoder, mesh)
  tcfg = config.encoder_train
  if "test" in info["splits"] and (todo or not _already_evaluated(workdir)):
    metrics = two_tower_recall(load_embeddings(workdir, "test"), config.evaluate.recall_ks, mesh,
                               query_batch=int(tcfg.query_batch_size),
                               chunk_size=int(tcfg.retrieval_chunk_size))
    MetricsWriter(workdir, "embed", process_index=jax.process_index()).write(
        method="two_tower", split="test", **{k: v for k, v in metrics.items() if k[0] != "_"})
    shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k.startswith("R@"))
    print(f"two-tower (test, {info['splits']['test']['num_captions']} queries over "
          f"{info['splits']['test']['num_images']} images): {shown}")
