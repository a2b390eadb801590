"""`avg-jax prepare`: dataset -> ArrayRecord files + text tokenizer + dataset_info.json.

Output, `paths.prepared_dir(workdir)`:

    dataset_info.json        counts per split, captions per image, image size, dataset name,
                             config hash, file manifest (written last)
    text_tokenizer.model     SentencePiece (trained on the training captions, or the given one)
    pseudo_queries.jsonl     extra (image id, query) pairs: generated for avg_shapes, the file
                             of `data.pseudo_queries` for Karpathy data (avg_jax.data.pseudo_queries)
    tfds/<name>/1.0.0/       the TFDS builder's ArrayRecord files

Several processes (a multi-host run) share the work: the images are cut into shards of
`data.examples_per_shard` (avg_jax.data.builders), process p of n writes shards p, p+n, ...
into `paths.prepared_shards_dir(workdir)`, skipping those a previous run finished. Once every
shard exists, process 0 alone lays them out as the TFDS directory, trains the tokenizer and
writes the statistics and dataset_info.json, while the others wait for it.

Atomic and idempotent: process 0 assembles everything in `prepared.tmp-<host>-<pid>-*` and
renames it into place, so `prepared/` is either absent or complete (the shards directory is
then removed). A complete directory whose config hash matches is kept (and reported as such);
one that fails its manifest check (a half-written or damaged copy) is removed and redone, as
are temp directories left by interrupted runs; one prepared from a different data config is
an error (later stages built on it would be stale).
"""

import glob
import hashlib
import itertools
import json
import os
import shutil
import socket
import tempfile
import time
from typing import Any, Iterator

import jax
import numpy as np

from avg_jax import paths
from avg_jax.data import builders
from avg_jax.data import dataset as dataset_lib
from avg_jax.data import pseudo_queries as pseudo_lib
from avg_jax.data import shapes as shapes_lib
from avg_jax.data import shards as shards_lib
from avg_jax.data.text_tokenizer import TextTokenizer
from avg_jax.errors import UserError
from avg_jax.metrics import MetricsWriter
from avg_jax.progress import progress

FORMAT_VERSION = 2  # 2: pseudo_queries.jsonl
INFO_NAME = os.path.basename(paths.dataset_info_file("w"))
TOKENIZER_NAME = os.path.basename(paths.text_tokenizer_model("w"))


def _file_sha256(path: str, what: str) -> str:
  digest = hashlib.sha256()
  try:
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
  except OSError as e:
    raise UserError(f"{what} not readable: {path} ({e.strerror})") from e
  return digest.hexdigest()


def data_identity(config: Any) -> dict:
  """The config values (and input file digests) that determine the prepared output."""
  d, t = config.data, config.text_tokenizer
  identity = {"format_version": FORMAT_VERSION, "data.name": d.name,
              "data.image_size": int(d.image_size),
              "data.captions_per_image": int(d.captions_per_image),
              "data.image_encoding": d.image_encoding}
  if d.image_encoding == "jpeg":
    identity["data.jpeg_quality"] = int(d.jpeg_quality)
  if d.name == "avg_shapes":
    for key in ("num_train", "num_val", "num_test", "generator_seed", "pseudo_queries_per_image"):
      identity[f"data.{key}"] = int(d[key])
  elif d.name == "karpathy":
    identity["data.karpathy_json"] = os.path.abspath(d.karpathy_json) if d.karpathy_json else ""
    if d.karpathy_json and os.path.isfile(d.karpathy_json):
      identity["karpathy_json sha256"] = _file_sha256(d.karpathy_json, "data.karpathy_json")
    identity["data.image_root"] = os.path.abspath(d.image_root) if d.image_root else ""
    identity["data.skip_bad_images"] = bool(d.skip_bad_images)
    identity["data.pseudo_queries"] = os.path.abspath(d.pseudo_queries) if d.pseudo_queries else ""
    if d.pseudo_queries and os.path.isfile(d.pseudo_queries):
      identity["pseudo_queries sha256"] = _file_sha256(d.pseudo_queries, "data.pseudo_queries")
  if t.model_path:
    identity["text_tokenizer.model_path"] = os.path.abspath(t.model_path)
    identity["text_tokenizer sha256"] = _file_sha256(t.model_path, "text_tokenizer.model_path")
  else:
    identity["text_tokenizer.vocab_size"] = int(t.vocab_size)
    identity["text_tokenizer.model_type"] = t.model_type
  return identity


def config_hash(identity: dict) -> str:
  return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def shard_tag(identity: dict) -> str:
  """What the record shards depend on: the identity less the text tokenizer (trained after
  the shards), so changing only the tokenizer reuses them."""
  return config_hash({k: v for k, v in identity.items() if not k.startswith("text_tokenizer")})


def _manifest(root: str) -> dict[str, int]:
  """`{relative path: size}` of every file under `root` (except dataset_info.json)."""
  files = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      rel = os.path.relpath(path, root)
      if rel != INFO_NAME:
        files[rel] = os.path.getsize(path)
  return dict(sorted(files.items()))


def check_prepared(out_dir: str) -> tuple[str, str, dict | None]:
  """("missing" | "incomplete" | "complete", reason, info) for an existing output dir."""
  if not os.path.isdir(out_dir):
    return "missing", "", None
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
  return "complete", "", info


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _temp_prefix(out_dir: str) -> str:
  # Host and pid in the name: only this host can tell whether the writer is still alive.
  host = socket.gethostname().replace("-", "_") or "host"
  return f"{os.path.basename(out_dir)}.tmp-{host}-{os.getpid()}-"


def _remove_stale_temps(out_dir: str) -> list[str]:
  """Removes `<out_dir>.tmp-<host>-<pid>-*` left by this host's runs that are not alive.

  Temp dirs of live processes and of other hosts (a shared workdir) are left alone.
  """
  host = socket.gethostname().replace("-", "_") or "host"
  removed = []
  for path in sorted(glob.glob(glob.escape(out_dir) + ".tmp-*")):
    parts = os.path.basename(path).split(".tmp-", 1)[1].split("-")
    if len(parts) < 3 or parts[0] != host or not parts[1].isdigit():
      print(f"leaving {path}: written by another host or an unknown writer")
      continue
    pid = int(parts[1])
    if pid != os.getpid() and _pid_alive(pid):
      print(f"leaving {path}: process {pid} (another prepare?) is still running")
      continue
    shutil.rmtree(path, ignore_errors=True)
    removed.append(path)
  return removed


def _identity_diff(old: dict, new: dict) -> str:
  keys = sorted(set(old) | set(new))
  diffs = [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}"
           for k in keys if old.get(k) != new.get(k)]
  return "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")


def _captions(records: Any) -> Iterator[str]:
  """Every caption of a record source, in caption_source order (streamed)."""
  for i in range(len(records)):
    for caption in records[i]["captions"]:
      yield caption.decode("utf-8")


def _make_tokenizer(config: Any, builder_dir: str, out_path: str,
                    extra_texts: list[str]) -> tuple[TextTokenizer, str]:
  """Loads `text_tokenizer.model_path`, or trains one on the training captions plus
  `extra_texts` (the training images' pseudo queries, so that their words get pieces too)."""
  t = config.text_tokenizer
  if t.model_path:
    tokenizer = TextTokenizer.load(t.model_path)
    with open(out_path, "wb") as f:
      f.write(tokenizer.model_proto)
    return tokenizer, f"loaded from {t.model_path}"
  records = dataset_lib.records_in(builder_dir, "train")
  # A stream, not a list: SentencePiece keeps a bounded sample (input_sentence_size).
  texts = itertools.chain(_captions(records), extra_texts)
  tokenizer = TextTokenizer.train(texts, int(t.vocab_size), out_path, model_type=t.model_type)
  num_captions = len(records) * int(config.data.captions_per_image)
  extra = f" and {len(extra_texts)} of their pseudo queries" if extra_texts else ""
  return tokenizer, f"trained ({t.model_type}) on {num_captions} training captions{extra}"


_TOKENIZE_BATCH = 4096  # captions per SentencePiece call in the statistics pass


def _split_statistics(builder_dir: str, split: str, tokenizer: TextTokenizer,
                      want_attributes: bool) -> tuple[dict, dict | None]:
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
  stats = {"num_images": len(records), "num_captions": num_texts,
           "mean_caption_words": round(words / num_texts, 3),
           "mean_caption_tokens": round(tokens / num_texts, 3),
           "max_caption_tokens": int(max_tokens)}
  return stats, attributes.frequencies() if want_attributes else None


def _write_pseudo_queries(config: Any, builder_dir: str,
                          out_path: str) -> tuple[dict[str, int], list[str]]:
  """Writes `pseudo_queries.jsonl` (see `avg_jax.data.pseudo_queries`); -> (count per split,
  the pseudo queries of training images)."""
  d = config.data
  records = {split: dataset_lib.records_in(builder_dir, split) for split in builders.SPLITS}
  split_of = {}
  for split, source in records.items():
    for i in range(len(source)):
      split_of[int(source[i]["image_id"])] = split
  if d.name == "avg_shapes":
    pairs = list(pseudo_lib.shapes_pairs(records, int(d.generator_seed),
                                         int(d.pseudo_queries_per_image)))
  elif d.pseudo_queries:
    pairs = pseudo_lib.read_user_file(d.pseudo_queries, set(split_of))
  else:
    pairs = []
  pseudo_lib.write(out_path, pairs)
  counts = {split: 0 for split in builders.SPLITS}
  for image_id, _ in pairs:
    counts[split_of[image_id]] += 1
  return counts, [q for image_id, q in pairs if split_of[image_id] == "train"]


def _build(config: Any, tmp: str, identity: dict, source: builders.Source,
           shards_dir: str) -> dict:
  """Writes everything into `tmp` from the finished shards; returns the dataset info (also
  written there, last)."""
  result = builders.assemble(source, shards_dir, os.path.join(tmp, "tfds"),
                             shard_tag(identity))
  pseudo_counts, train_pseudo = _write_pseudo_queries(config, result.builder_dir,
                                                      os.path.join(tmp, pseudo_lib.FILE_NAME))
  tokenizer, tokenizer_source = _make_tokenizer(
      config, result.builder_dir, os.path.join(tmp, TOKENIZER_NAME), train_pseudo)
  splits, frequencies = {}, None
  for split in builders.SPLITS:
    want_attributes = config.data.name == "avg_shapes" and split == "train"
    splits[split], split_frequencies = _split_statistics(
        result.builder_dir, split, tokenizer, want_attributes)
    frequencies = split_frequencies or frequencies
  for split in builders.SPLITS:
    splits[split]["num_pseudo_queries"] = pseudo_counts[split]
  size = int(config.data.image_size)
  info = {
      "dataset": config.data.name,
      "splits": splits,
      "captions_per_image": int(config.data.captions_per_image),
      "image_size": [size, size],
      "image_encoding": config.data.image_encoding,
      "config_hash": config_hash(identity),
      "identity": identity,
      "format_version": FORMAT_VERSION,
      "tfds_dir": os.path.relpath(result.builder_dir, tmp),
      "text_tokenizer": {"file": TOKENIZER_NAME, "vocab_size": tokenizer.vocab_size,
                         "source": tokenizer_source},
      "skipped_images": {"count": len(result.skipped),
                         "first": [f"{p} ({why})" for p, why in result.skipped[:20]]},
      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }
  if frequencies is not None:
    info["attribute_frequencies"] = frequencies
  info["files"] = _manifest(tmp)
  info_path = os.path.join(tmp, INFO_NAME)
  with open(info_path, "w", encoding="utf-8") as f:
    json.dump(info, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  return info


def format_statistics(info: dict) -> str:
  """The table `prepare` prints: per split counts and caption lengths; attribute shares."""
  lines = [f"{'split':<6} {'images':>8} {'captions':>9} {'words/cap':>10} {'tokens/cap':>11} "
           f"{'pseudo queries':>15}"]
  for split, s in info["splits"].items():
    lines.append(f"{split:<6} {s['num_images']:>8} {s['num_captions']:>9} "
                 f"{s['mean_caption_words']:>10.2f} {s['mean_caption_tokens']:>11.2f} "
                 f"{s.get('num_pseudo_queries', 0):>15}")
  tok = info["text_tokenizer"]
  lines.append(f"text tokenizer: vocab size {tok['vocab_size']}, {tok['source']}")
  if info["skipped_images"]["count"]:
    lines.append(f"skipped images: {info['skipped_images']['count']}")
  frequencies = info.get("attribute_frequencies")
  if frequencies:
    lines.append("attribute frequencies (train):")
    for key, counts in frequencies.items():
      total = sum(counts.values())
      shares = ", ".join(f"{name} {100 * n / total:.0f}%" for name, n in counts.items())
      lines.append(f"  {key:<9} {shares}")
  return "\n".join(lines)


def _write_metrics(workdir: str, info: dict, *, reused: bool, seconds: float,
                   shard_counts: dict | None = None) -> None:
  """One record per split; `shard_counts[split] = (shards, skipped, written)` over all
  processes when this run built the data."""
  writer = MetricsWriter(workdir, "prepare", process_index=jax.process_index())
  for split, s in info["splits"].items():
    shards = {}
    if shard_counts is not None:
      total, skipped, written = shard_counts[split]
      shards = dict(shards=total, shards_skipped=skipped, shards_written=written)
    writer.write(split=split, dataset=info["dataset"], num_images=s["num_images"],
                 num_captions=s["num_captions"], mean_caption_tokens=s["mean_caption_tokens"],
                 vocab_size=info["text_tokenizer"]["vocab_size"], reused=reused,
                 seconds=round(seconds, 3), **shards)


def write_shards(config: Any, workdir: str, process_index: int,
                 process_count: int) -> dict[str, tuple[int, int, int]]:
  """Process `process_index` of `process_count`'s part of `run`: its shards of the records
  (finished ones skipped); -> `{split: (shards, skipped, written)}` for its shards."""
  return builders.write_shards(builders.open_source(config.data),
                               paths.prepared_shards_dir(workdir),
                               shard_tag(data_identity(config)), process_index, process_count)


def _finish(config: Any, workdir: str, identity: dict, source: builders.Source) -> dict:
  """Process 0, once every shard exists: `prepared/` from the shards, atomically; -> info."""
  out_dir = paths.prepared_dir(workdir)
  shards_dir = paths.prepared_shards_dir(workdir)
  if check_prepared(out_dir)[0] == "incomplete":
    shutil.rmtree(out_dir)
  tmp = tempfile.mkdtemp(prefix=_temp_prefix(out_dir), dir=os.path.dirname(out_dir) or ".")
  try:
    info = _build(config, tmp, identity, source, shards_dir)
    try:
      os.rename(tmp, out_dir)
    except OSError:
      # Another job (e.g. started separately on a shared workdir) finished first: keep its
      # output if it is complete and for the same config.
      status, _, other = check_prepared(out_dir)
      if status != "complete" or other.get("config_hash") != info["config_hash"]:
        raise
      shutil.rmtree(tmp, ignore_errors=True)
      print(f"{out_dir} was completed by another process meanwhile; kept it")
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  # The records now live in prepared/ (hard links or copies): the shards are no longer needed.
  shutil.rmtree(shards_dir, ignore_errors=True)
  return info


def run(config: Any, workdir: str, *, process_index: int | None = None,
        process_count: int | None = None) -> None:
  """The prepare stage (see the module docstring). `process_index` / `process_count` default
  to jax's; tests pass others to play one process of several."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  start = time.time()
  out_dir = paths.prepared_dir(workdir)
  os.makedirs(workdir, exist_ok=True)
  identity = data_identity(config)
  if index == 0:
    for path in _remove_stale_temps(out_dir):
      print(f"removed {path}: left by an interrupted prepare")

  # Every process sees the same state here: prepared/ only changes after all have written
  # their shards (below).
  status, reason, info = check_prepared(out_dir)
  if status == "complete":
    if info.get("config_hash") != config_hash(identity):
      raise UserError(
          f"{out_dir} was prepared for a different data config "
          f"({_identity_diff(info.get('identity', {}), identity)}); use another --workdir or "
          f"delete {out_dir}")
    print(f"{out_dir} is complete for this data config (hash {info['config_hash']}); kept")
    print(format_statistics(info))
    _write_metrics(workdir, info, reused=True, seconds=time.time() - start)
    return
  if status == "incomplete" and index == 0:
    print(f"{out_dir} is incomplete ({reason}); preparing it again")

  source = builders.open_source(config.data)
  counts = builders.write_shards(source, paths.prepared_shards_dir(workdir),
                                 shard_tag(identity), index, count)
  # A collective: once it returns, every process has written its shards.
  totals = shards_lib.sum_over_processes(np.array([counts[s] for s in builders.SPLITS]))
  error = None
  if index == 0:
    try:
      info = _finish(config, workdir, identity, source)
    except Exception as e:  # pylint: disable=broad-except (re-raised below, after telling
      error = e             # the other processes, which would otherwise wait forever)
  if not shards_lib.process_0_succeeded(error is None):
    if error is not None:
      raise error
    raise UserError(f"prepare failed in process 0 (see its error); {out_dir} was not written")
  if index != 0:
    print(f"{out_dir} was prepared by process 0")
    return
  print(f"prepared {info['dataset']} in {out_dir} ({time.time() - start:.1f} s)")
  print(format_statistics(info))
  shard_counts = {s: tuple(int(x) for x in totals[i]) for i, s in enumerate(builders.SPLITS)}
  _write_metrics(workdir, info, reused=False, seconds=time.time() - start,
                 shard_counts=shard_counts)
