"""The input paths a config needs, checked before any stage runs (`avg-jax run` / a stage).

A config lists the keys of the paths it cannot run without in `required_inputs` (the paper
configs: the Karpathy JSON, the image folder, the CLIP and T5 directories and the pseudo-query
file). `check` reports every missing or wrong one at once, one line each naming the key and
what to pass, so that a pod run stops in its first second rather than after hours of `prepare`
or `embed`. Besides the listed keys, a pretrained T5 must bring the text tokenizer the prepare
stage loads (`avg_jax.data.prepared.tokenizer_model_path`).
"""

import os
from typing import Any

from avg_jax import config as config_lib
from avg_jax.data import prepared
from avg_jax.errors import UserError

# key -> (kind of path, what to pass)
KNOWN = {
  "data.karpathy_json": (
    "file",
    "the Karpathy split JSON (dataset_flickr30k.json or dataset_coco.json)",
  ),
  "data.image_root": ("dir", "the folder holding the dataset's images"),
  "encoder.pretrained_path": (
    "dir",
    "a Hugging Face CLIP directory (config.json, model.safetensors, vocab.json, merges.txt)",
  ),
  "t5.pretrained_path": (
    "dir",
    "a Hugging Face T5 directory (config.json, model.safetensors, spiece.model)",
  ),
  "data.pseudo_queries": (
    "file",
    'the pseudo queries of the indexed images, JSON lines {"image_id": ..., "query": ...}',
  ),
}


def _uses_transductive(config: Any) -> bool:
  protocols = {config.protocol, *config.evaluate.protocols, *config.evaluate.ablation_protocols}
  return "transductive" in protocols


def _problem(value: str, kind: str) -> str:
  """ "" when `value` names an existing path of `kind`, else what is wrong with it."""
  if not value:
    return "not set"
  if kind == "file" and not os.path.isfile(value):
    return f"{value} is not a file" if os.path.exists(value) else f"{value} not found"
  if kind == "dir" and not os.path.isdir(value):
    return f"{value} is not a folder" if os.path.exists(value) else f"{value} not found"
  return ""


def problems(config: Any) -> list[str]:
  """One line per required input that is missing or wrong (empty: all present)."""
  lines = []
  for key in config.get("required_inputs", ()):
    if key not in KNOWN:
      raise UserError(f"config required_inputs: unknown key {key!r} (known: {', '.join(KNOWN)})")
    if key == "data.pseudo_queries" and not _uses_transductive(config):
      continue
    kind, what = KNOWN[key]
    problem = _problem(str(config_lib.get(config, key)), kind)
    if problem:
      hint = (
        " (or run the inductive protocol alone: --config.protocol=inductive "
        "--config.evaluate.protocols='(\"inductive\",)' "
        "--config.evaluate.ablation_protocols='(\"inductive\",)')"
        if key == "data.pseudo_queries"
        else ""
      )
      lines.append(f"{key}: {problem}; pass --config.{key}=<{what}>{hint}")
  # The text tokenizer: given, or the pretrained T5's own (checked once T5's folder exists).
  model = prepared.tokenizer_model_path(config)
  t5_dir = str(config.t5.pretrained_path)
  if model and (config.text_tokenizer.model_path or os.path.isdir(t5_dir)):
    problem = _problem(model, "file")
    if problem:
      source = (
        "" if config.text_tokenizer.model_path else " (the text tokenizer of t5.pretrained_path)"
      )
      lines.append(
        f"text_tokenizer.model_path: {problem}{source}; pass "
        f"--config.text_tokenizer.model_path=<the T5's SentencePiece model>"
      )
  return lines


def check(config: Any) -> None:
  """Raises one `UserError` listing every problem of `problems`, one per line."""
  lines = problems(config)
  if lines:
    raise UserError(f"{len(lines)} input path(s) missing or wrong; nothing was run:", lines)
