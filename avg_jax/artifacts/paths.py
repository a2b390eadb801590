"""Where each stage writes inside a workdir: the one place that knows the layout.

Every stage folder below carries `fingerprint.json` (avg_jax.artifacts.fingerprint): the
inputs it was made from and whether it is complete.

    <workdir>/metrics.jsonl                     every stage's metrics (avg_jax.metrics)
    <workdir>/prepared/                         dataset_info.json, text tokenizer, ArrayRecord files
    <workdir>/prepared.shards/                  records being written, one file per shard
                                                (removed once prepared/ is complete)
    <workdir>/embed/                            dual-encoder checkpoint, embeddings_<split>.npz
    <workdir>/embed/shards/                     embedding rows being written, one file per shard
                                                (removed once merged into embeddings_<split>.npz)
    <workdir>/embed/pseudo_queries.npz          the prepared pseudo queries, embedded
    <workdir>/tokenizer/<name>/                 RQ-VAE checkpoint, voken_table.npz, codebook.npy
                                                (<name>: <scheme>, or <scheme>+pseudo for a
                                                fit on pseudo-query pairs too)
    <workdir>/train/<protocol>/<scheme>/        generative-stage checkpoints/ and params/
    <workdir>/rank/<protocol>/<scheme>/         learning-to-rank checkpoints/ and params/
    <workdir>/evaluate/                         metrics.json (avg_jax.artifacts.results),
                                                report.md, plots
    <workdir>/export/                           the serving checkpoint
"""

import os


def prepared_dir(workdir: str) -> str:
  return os.path.join(workdir, "prepared")


def prepared_shards_dir(workdir: str) -> str:
  return os.path.join(workdir, "prepared.shards")


def dataset_info_file(workdir: str) -> str:
  return os.path.join(prepared_dir(workdir), "dataset_info.json")


def text_tokenizer_model(workdir: str) -> str:
  return os.path.join(prepared_dir(workdir), "text_tokenizer.model")


def embed_dir(workdir: str) -> str:
  return os.path.join(workdir, "embed")


def embed_shards_dir(workdir: str) -> str:
  return os.path.join(embed_dir(workdir), "shards")


def embeddings_file(workdir: str, split: str) -> str:
  return os.path.join(embed_dir(workdir), f"embeddings_{split}.npz")


def pseudo_query_embeddings_file(workdir: str) -> str:
  return os.path.join(embed_dir(workdir), "pseudo_queries.npz")


def tokenizer_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, "tokenizer", name)


def train_dir(workdir: str, scheme: str, protocol: str) -> str:
  return os.path.join(workdir, "train", protocol, scheme)


def rank_dir(workdir: str, scheme: str, protocol: str) -> str:
  return os.path.join(workdir, "rank", protocol, scheme)


def generator_dir(workdir: str, scheme: str, protocol: str, stage: str) -> str:
  """The folder of a generator stage: `stage` is "train" or "rank"."""
  base = {"train": train_dir, "rank": rank_dir}[stage]
  return base(workdir, scheme, protocol)


def checkpoints_dir(directory: str) -> str:
  """A training stage's resumable checkpoints inside its folder."""
  return os.path.join(directory, "checkpoints")


def final_params_dir(directory: str) -> str:
  """A finished training stage's parameters (no optimizer state) inside its folder."""
  return os.path.join(directory, "params")


def evaluate_dir(workdir: str) -> str:
  return os.path.join(workdir, "evaluate")


# The evaluate stage's results (avg_jax/artifacts/results.py), inside its folder.
EVALUATE_RESULTS = "metrics.json"


def evaluate_results_file(workdir: str) -> str:
  return os.path.join(evaluate_dir(workdir), EVALUATE_RESULTS)


def export_dir(workdir: str) -> str:
  return os.path.join(workdir, "export")
