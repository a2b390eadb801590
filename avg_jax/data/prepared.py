"""The prepared dataset: what `prepare` builds and how a prepared folder is checked.

`paths.prepared_dir(workdir)` holds:

    dataset_info.json        counts per split, captions per image, image size, dataset name,
                             the data identity's digest (`config_hash`), file manifest
    text_tokenizer.model     SentencePiece: the given one (`tokenizer_model_path`) or, when
                             none is given, one trained on the training captions
    skipped_images.json      every image left out by `data.skip_bad_images`, with its reason
                             (only when some were; dataset_info.json has the count)
    pseudo_queries.jsonl     extra (image id, query) pairs: generated for avg_shapes, the file
                             of `data.pseudo_queries` for Karpathy data
                             (avg_jax.data.pseudo_queries)
    tfds/<name>/1.0.0/       the TFDS builder's ArrayRecord files
    checksums.json           size and SHA-256 of each file above (avg_jax.artifacts.checksums):
                             readers check the files they open (`dataset.record_source`)
    fingerprint.json         the data identity it was made from (avg_jax.artifacts.fingerprint;
                             written last)

`data_identity` lists the config values (and input file digests) the output depends on;
`build` assembles a folder from finished record shards (avg_jax.data.builders); `check_prepared`
tells a complete folder from a half-written or damaged one by its manifest and checksums. The
stage that runs them over several processes is avg_jax/stages/prepare.py.
"""

import itertools
import json
import os
import time
from collections.abc import Iterator
from typing import Any

from avg_jax.artifacts import checksums, fingerprint, io, paths, stage_inputs
from avg_jax.data import builders
from avg_jax.data import dataset as dataset_lib
from avg_jax.data import pseudo_queries as pseudo_lib
from avg_jax.data import shapes as shapes_lib
from avg_jax.data.text_tokenizer import TextTokenizer
from avg_jax.errors import UserError
from avg_jax.progress import progress

FORMAT_VERSION = 3  # 2: pseudo_queries.jsonl; 3: checksums.json
INFO_NAME = os.path.basename(paths.dataset_info_file("w"))
TOKENIZER_NAME = os.path.basename(paths.text_tokenizer_model("w"))


T5_SPIECE = "spiece.model"  # the SentencePiece model in a Hugging Face T5 directory


def tokenizer_model_path(config: Any) -> str:
  """The SentencePiece model to load, or "" to train one on the training captions.

  The one rule: `text_tokenizer.model_path` when set; else, with a pretrained T5
  (`t5.pretrained_path`), that directory's `spiece.model` (a pretrained model's text rows
  only mean something with its own tokenizer, so one is never trained for it); else "".
  """
  if config.text_tokenizer.model_path:
    return str(config.text_tokenizer.model_path)
  if config.t5.pretrained_path:
    return os.path.join(str(config.t5.pretrained_path), T5_SPIECE)
  return ""


def _model_path_key(config: Any) -> str:
  """The config key a user sets to change the loaded model (for error messages)."""
  if config.text_tokenizer.model_path:
    return "text_tokenizer.model_path"
  return f"text_tokenizer.model_path (empty: t5.pretrained_path's {T5_SPIECE})"


def data_identity(config: Any) -> dict:
  """What the prepared output is made from: the prepare stage's inputs (the config keys it
  reads and digests of the input files they name: avg_jax/artifacts/stage_inputs.py) and
  this module's format. A text tokenizer model that cannot be read is named before any
  work."""
  model_path = tokenizer_model_path(config)
  if model_path:
    try:
      with open(model_path, "rb"):
        pass
    except OSError as e:
      raise UserError(f"{_model_path_key(config)} not readable: {model_path} ({e.strerror})") from e
  identity = dict(stage_inputs.inputs("prepare", config), format_version=FORMAT_VERSION)
  if config.data.name == "emoji":  # pinned packages and caption rules: code, not config
    from avg_jax.data import emoji  # noqa: PLC0415

    identity["emoji"] = {"packages": emoji.PACKAGES, "rules": emoji.RULES_VERSION}
  return identity


# Keys of the text tokenizer, trained or loaded after the shards are written.
_TOKENIZER_KEYS = ("text_tokenizer.", "t5.")


def shard_tag(identity: dict) -> str:
  """What the record shards depend on: the identity less the text tokenizer (trained after
  the shards), so changing only the tokenizer reuses them."""
  return fingerprint.digest(
    {
      part: (
        {k: v for k, v in value.items() if not k.startswith(_TOKENIZER_KEYS)}
        if isinstance(value, dict)
        else value
      )
      for part, value in identity.items()
    }
  )


def _manifest(root: str) -> dict[str, int]:
  """`{relative path: size}` of every file under `root` (except dataset_info.json and the
  fingerprint, written after it)."""
  files = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      rel = os.path.relpath(path, root)
      if rel not in (INFO_NAME, fingerprint.RECORD):
        files[rel] = os.path.getsize(path)
  return dict(sorted(files.items()))


def check_prepared(out_dir: str) -> tuple[str, str, dict | None]:
  """("missing" | "incomplete" | "complete", reason, info) for an existing output dir."""
  if not os.path.isdir(out_dir):
    return "missing", "", None
  record = io.read_json(os.path.join(out_dir, fingerprint.RECORD))
  if not (record or {}).get("complete"):
    return "incomplete", f"{fingerprint.RECORD} missing or unfinished", None
  info_path = os.path.join(out_dir, INFO_NAME)
  try:
    with open(info_path, encoding="utf-8") as f:
      info = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    return "incomplete", f"{INFO_NAME} missing or unreadable ({type(e).__name__})", None
  if info.get("format_version") != FORMAT_VERSION or "files" not in info:
    return "incomplete", f"{INFO_NAME} is from another format version", None
  for rel, size in info["files"].items():
    path = os.path.join(out_dir, rel)
    if not os.path.isfile(path):
      return "incomplete", f"{rel} is missing", info
    if os.path.getsize(path) != size:
      return "incomplete", f"{rel} has {os.path.getsize(path)} bytes, expected {size}", info
  # Bytes changed in place keep the sizes: only the contents tell (reads every file once).
  problem = checksums.verify(out_dir)
  if problem:
    return "incomplete", f"damaged: {problem}", info
  return "complete", "", info


def _captions(records: Any) -> Iterator[str]:
  """Every caption of a record source, in caption_source order (streamed)."""
  for i in range(len(records)):
    for caption in records[i]["captions"]:
      yield caption.decode("utf-8")


def _make_tokenizer(
  config: Any, builder_dir: str, out_path: str, extra_texts: list[str]
) -> tuple[TextTokenizer, str]:
  """Loads `tokenizer_model_path(config)`, or trains one on the training captions plus
  `extra_texts` (the training images' pseudo queries, so that their words get pieces too)."""
  t = config.text_tokenizer
  model_path = tokenizer_model_path(config)
  if model_path:
    tokenizer = TextTokenizer.load(model_path)
    with open(out_path, "wb") as f:
      f.write(tokenizer.model_proto)
    return tokenizer, f"loaded from {model_path}"
  records = dataset_lib.records_in(builder_dir, "train")
  # A stream, not a list: SentencePiece keeps a bounded sample (input_sentence_size).
  texts = itertools.chain(_captions(records), extra_texts)
  tokenizer = TextTokenizer.train(texts, int(t.vocab_size), out_path, model_type=t.model_type)
  num_captions = len(records) * int(config.data.captions_per_image)
  extra = f" and {len(extra_texts)} of their pseudo queries" if extra_texts else ""
  return tokenizer, f"trained ({t.model_type}) on {num_captions} training captions{extra}"


_TOKENIZE_BATCH = 4096  # captions per SentencePiece call in the statistics pass


def _split_statistics(
  builder_dir: str, split: str, tokenizer: TextTokenizer, want_attributes: bool
) -> tuple[dict, dict | None]:
  """(counts and caption lengths of `split`, attribute frequencies or None), from one
  streaming pass over its records (memory does not grow with the split)."""
  records = dataset_lib.records_in(builder_dir, split)
  num_texts = words = tokens = max_tokens = 0
  pending: list[str] = []
  attributes = shapes_lib.AttributeCounter()
  for i in progress(range(len(records)), total=len(records), desc=f"statistics {split}"):
    record = records[i]
    texts = [c.decode("utf-8") for c in record["captions"]]
    num_texts += len(texts)
    words += sum(len(t.split()) for t in texts)
    pending.extend(texts)
    if len(pending) >= _TOKENIZE_BATCH or i == len(records) - 1:
      lengths = [len(ids) for ids in tokenizer.encode_many(pending)]
      tokens, max_tokens, pending = tokens + sum(lengths), max(max_tokens, *lengths), []
    if want_attributes:
      attributes.add(record["attributes"].decode("utf-8"))
  # Integer sums divided once: the same floats as np.mean over the per-caption lengths.
  stats = {
    "num_images": len(records),
    "num_captions": num_texts,
    "mean_caption_words": round(words / num_texts, 3),
    "mean_caption_tokens": round(tokens / num_texts, 3),
    "max_caption_tokens": int(max_tokens),
  }
  return stats, attributes.frequencies() if want_attributes else None


def _write_pseudo_queries(
  config: Any, builder_dir: str, out_path: str, source: builders.Source
) -> tuple[dict[str, int], list[str]]:
  """Writes `pseudo_queries.jsonl` (see `avg_jax.data.pseudo_queries`); -> (count per split,
  the pseudo queries of training images)."""
  d = config.data
  records = {split: dataset_lib.records_in(builder_dir, split) for split in builders.SPLITS}
  split_of = {}
  for split, split_records in records.items():
    for i in range(len(split_records)):
      split_of[int(split_records[i]["image_id"])] = split
  if d.name == "avg_shapes":
    pairs = list(
      pseudo_lib.shapes_pairs(records, int(d.generator_seed), int(d.pseudo_queries_per_image))
    )
  elif source.pseudo_queries is not None:  # the source's own (emoji)
    pairs = source.pseudo_queries
  elif d.pseudo_queries:
    pairs = pseudo_lib.read_user_file(d.pseudo_queries, set(split_of))
  else:
    pairs = []
  pseudo_lib.write(out_path, pairs)
  counts = {split: 0 for split in builders.SPLITS}
  for image_id, _ in pairs:
    counts[split_of[image_id]] += 1
  return counts, [q for image_id, q in pairs if split_of[image_id] == "train"]


SKIPPED_NAME = "skipped_images.json"
_SKIPPED_IN_INFO = 20  # dataset_info.json stays small however many images were left out


def _write_skipped(tmp: str, skipped: list[tuple[str, str]]) -> dict:
  """Writes every skipped image with its reason to `SKIPPED_NAME` (only when there are any)
  -> dataset_info.json's `skipped_images`: the count, that file's name, the first few."""
  if not skipped:
    return {"count": 0, "first": []}
  io.write_json(
    os.path.join(tmp, SKIPPED_NAME), [{"path": path, "reason": why} for path, why in skipped]
  )
  return {
    "count": len(skipped),
    "file": SKIPPED_NAME,
    "first": [f"{p} ({why})" for p, why in skipped[:_SKIPPED_IN_INFO]],
  }


def build(
  config: Any, tmp: str, identity: dict, source: builders.Source, shards_dir: str
) -> tuple[dict, dict[str, float]]:
  """Writes everything into `tmp` from the finished shards; -> (the dataset info, also
  written there, last but for the fingerprint, which the caller adds; the seconds of each
  serial step: assemble, pseudo_queries, text_tokenizer, statistics)."""
  # Seconds of each serial step (process 0's alone; the shards were written in parallel).
  seconds, clock = {}, time.perf_counter()

  def lap(name: str) -> None:
    nonlocal clock
    now = time.perf_counter()
    seconds[name], clock = round(now - clock, 3), now

  result = builders.assemble(source, shards_dir, os.path.join(tmp, "tfds"), shard_tag(identity))
  lap("assemble")
  pseudo_counts, train_pseudo = _write_pseudo_queries(
    config, result.builder_dir, os.path.join(tmp, pseudo_lib.FILE_NAME), source
  )
  lap("pseudo_queries")
  tokenizer, tokenizer_source = _make_tokenizer(
    config, result.builder_dir, os.path.join(tmp, TOKENIZER_NAME), train_pseudo
  )
  lap("text_tokenizer")
  splits, frequencies = {}, None
  for split in builders.SPLITS:
    want_attributes = config.data.name == "avg_shapes" and split == "train"
    splits[split], split_frequencies = _split_statistics(
      result.builder_dir, split, tokenizer, want_attributes
    )
    frequencies = split_frequencies or frequencies
  lap("statistics")
  for split in builders.SPLITS:
    splits[split]["num_pseudo_queries"] = pseudo_counts[split]
  size = int(config.data.image_size)
  info = {
    "dataset": config.data.name,
    "splits": splits,
    "captions_per_image": int(config.data.captions_per_image),
    "image_size": [size, size],
    "image_encoding": config.data.image_encoding,
    "config_hash": fingerprint.digest(identity),
    "format_version": FORMAT_VERSION,
    "tfds_dir": os.path.relpath(result.builder_dir, tmp),
    "text_tokenizer": {
      "file": TOKENIZER_NAME,
      "vocab_size": tokenizer.vocab_size,
      "source": tokenizer_source,
    },
    "skipped_images": _write_skipped(tmp, result.skipped),
    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }
  if frequencies is not None:
    info["attribute_frequencies"] = frequencies
  info["files"] = _manifest(tmp)
  io.write_json(os.path.join(tmp, INFO_NAME), info)
  checksums.write(tmp)  # every file, dataset_info.json included; readers check them
  return info, seconds


def format_statistics(info: dict) -> str:
  """The table `prepare` prints: per split counts and caption lengths; attribute shares."""
  lines = [
    f"{'split':<6} {'images':>8} {'captions':>9} {'words/cap':>10} {'tokens/cap':>11} "
    f"{'pseudo queries':>15}"
  ]
  for split, s in info["splits"].items():
    lines.append(
      f"{split:<6} {s['num_images']:>8} {s['num_captions']:>9} "
      f"{s['mean_caption_words']:>10.2f} {s['mean_caption_tokens']:>11.2f} "
      f"{s.get('num_pseudo_queries', 0):>15}"
    )
  tok = info["text_tokenizer"]
  lines.append(f"text tokenizer: vocab size {tok['vocab_size']}, {tok['source']}")
  skipped = info["skipped_images"]
  if skipped["count"]:
    listed = f" (each with its reason in {skipped['file']})" if skipped.get("file") else ""
    lines.append(f"skipped images: {skipped['count']}{listed}")
  frequencies = info.get("attribute_frequencies")
  if frequencies:
    lines.append("attribute frequencies (train):")
    for key, counts in frequencies.items():
      total = sum(counts.values())
      shares = ", ".join(f"{name} {100 * n / total:.0f}%" for name, n in counts.items())
      lines.append(f"  {key:<9} {shares}")
  return "\n".join(lines)


def write_shards(
  config: Any, workdir: str, process_index: int, process_count: int
) -> dict[str, tuple[int, int, int]]:
  """Process `process_index` of `process_count`'s part of `run`: its shards of the records
  (finished ones skipped); -> `{split: (shards, skipped, written)}` for its shards."""
  return builders.write_shards(
    builders.open_source(config.data),
    paths.prepared_shards_dir(workdir),
    shard_tag(data_identity(config)),
    process_index,
    process_count,
  )
