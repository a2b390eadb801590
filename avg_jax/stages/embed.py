"""`avg-jax embed`: the dual encoder, per-split embeddings and the two-tower baseline.

    <workdir>/embed/fingerprint.json        what the folder is made from (checked on reruns)
    <workdir>/embed/checkpoints/            train state + data iterator while training (removed
                                            once the encoder is saved)
    <workdir>/embed/encoder/, encoder.json  the dual encoder (avg_jax/encoders/store.py)
    <workdir>/embed/embeddings_<split>.npz  the embeddings (avg_jax/artifacts/embeddings.py)
    <workdir>/embed/shards/                 rows being extracted, one .npz per shard (removed
                                            once merged into embeddings_<split>.npz)
    <workdir>/embed/pseudo_queries.npz      the val / test images' pseudo queries, embedded by
                                            the text tower; only when a tokenizer fit needs
                                            them (`pseudo_queries_needed`)

The encoder is imported or trained on all processes together; feature extraction is split into
shards that each process embeds on its own devices (avg_jax/encoders/extract.py); process 0
merges them. Finished outputs (embedding files, and shards of an interrupted run) are kept on
reruns.
"""

import logging
import os
import time

import jax
import ml_collections

from avg_jax import partitioning, processes
from avg_jax.artifacts import embeddings, fingerprint, locks, paths, stage_inputs
from avg_jax.data import dataset
from avg_jax.encoders import extract, store
from avg_jax.evaluation import two_tower
from avg_jax.metrics import MetricsWriter, read_metrics

log = logging.getLogger(__name__)


def inputs(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict:
  """What the embed folder is made from (avg_jax/artifacts/stage_inputs.py: the encoder, its
  training, the seed, and the prepare stage's inputs)."""
  return stage_inputs.inputs("embed", config, workdir=workdir)


def pseudo_queries_needed(config: ml_collections.ConfigDict) -> bool:
  """Their only reader is a tokenizer fit on pseudo-query pairs (transductive protocol)."""
  protocols = {str(config.protocol), *(str(p) for p in config.evaluate.protocols)}
  return bool(config.tokenizer.fit_on_pseudo_queries) and "transductive" in protocols


def _already_evaluated(workdir: str) -> bool:
  return any(
    r.get("stage") == "embed" and r.get("method") == "two_tower" and r.get("split") == "test"
    for r in read_metrics(workdir)
  )


@locks.holding("embed")
def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Builds or loads the encoder, writes missing embeddings, reports two-tower Recall@K."""
  stage_inputs.require(config, workdir, "prepare")
  info = dataset.load_info(workdir)
  out = fingerprint.Output(
    paths.embed_dir(workdir),
    inputs(config, workdir),
    stage="embed",
    on_other=stage_inputs.STAGES["embed"].on_other,
  )
  complete = out.done()
  if not complete:
    out.begin()
  mesh = partitioning.make_mesh(config.mesh)
  _, meta_file = store.encoder_files(workdir)
  fresh = not os.path.exists(meta_file)
  problem = "" if fresh else store.encoder_problem(workdir)  # hashes the encoder's files
  if problem:
    # Bytes changed since it was saved: built again, with every embedding made from it.
    log.warning("embed: %s; building the encoder again", problem)
    fresh = True
  todo = []
  for split in info["splits"]:
    path = paths.embeddings_file(workdir, split)
    damage = embeddings.problem(workdir, path) if os.path.exists(path) and not fresh else ""
    if os.path.exists(path) and not fresh and not damage:
      log.info("embed: keeping %s", path)
    else:
      if damage:
        log.warning("embed: %s; redoing it", damage)
      todo.append(split)
  pseudo_file = paths.pseudo_query_embeddings_file(workdir)
  pseudo_todo = pseudo_queries_needed(config) and (
    bool(todo) or not os.path.exists(pseudo_file) or bool(embeddings.problem(workdir, pseudo_file))
  )
  # Only what is still to embed needs the encoder: a rerun over finished embeddings (`avg-jax
  # run` after this stage, a resumed pipeline) skips loading it (2-3 s of a process's CPU).
  encoder = None
  if fresh or todo or pseudo_todo:
    t0 = time.perf_counter()
    encoder = (
      store.build_encoder(config, workdir, mesh) if fresh else store.load_encoder(workdir, mesh)
    )
    log.info(
      "embed: encoder %s in %.1f s (%s)",
      "built" if fresh else "loaded",
      time.perf_counter() - t0,
      store.describe(encoder.cfg),
    )
  else:
    log.info("embed: encoder and embeddings kept; the encoder is not loaded")
  if todo:
    assert encoder is not None  # loaded above whenever a split is to embed
    local = store.local_encoder(encoder, config.mesh)
    totals, seconds = extract.extract_splits(config, workdir, encoder, local, todo, fresh)
    writer = MetricsWriter(workdir, "embed", process_index=jax.process_index())
    for split, (total, skipped, written) in zip(todo, totals.tolist()):
      writer.write(
        split=split,
        shards=total,
        shards_skipped=skipped,
        shards_written=written,
        processes=jax.process_count(),
        seconds=round(seconds, 3),
      )
  if not complete or todo:
    out.finish()
  if pseudo_todo:
    assert encoder is not None
    image_ids, emb = extract.embed_pseudo_queries(config, workdir, encoder, mesh)
    if processes.is_main():
      embeddings.write_pseudo_queries(workdir, image_ids, emb)
      log.info("embed: wrote %s (%d pseudo queries)", pseudo_file, len(image_ids))
    processes.barrier("embed: pseudo queries written")
  tcfg = config.encoder_train
  if "test" in info["splits"] and (todo or not _already_evaluated(workdir)):
    metrics = two_tower.recall(
      embeddings.load(workdir, "test"),
      config.evaluate.recall_ks,
      mesh,
      query_batch=int(tcfg.query_batch_size),
      chunk_size=int(tcfg.retrieval_chunk_size),
    )
    MetricsWriter(workdir, "embed", process_index=jax.process_index()).write(
      method="two_tower", split="test", **{k: v for k, v in metrics.items() if k[0] != "_"}
    )
    shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k.startswith("R@"))
    print(
      f"two-tower (test, {info['splits']['test']['num_captions']} queries over "
      f"{info['splits']['test']['num_images']} images): {shown}"
    )
