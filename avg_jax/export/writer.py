"""The serving checkpoint's writer: `write_export` puts a trained generator, its index and
what serving needs into one folder; `avg_jax.inference.retriever.Retriever.load` reads it.

The folder's layout and manifest: avg_jax/artifacts/exports.py. The optional parts have
their formats beside the code that reads them (avg_jax/inference/gallery.py,
avg_jax/inference/image_tokenizer.py); this module only composes them.
"""

import dataclasses
import os
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import avg_jax
from avg_jax import processes
from avg_jax.artifacts import checkpoints, checksums, exports, io
from avg_jax.data.text_tokenizer import TextTokenizer
from avg_jax.decoding.trie import VokenTrie
from avg_jax.encoders import store
from avg_jax.errors import UserError
from avg_jax.inference import gallery as gallery_lib
from avg_jax.inference import image_tokenizer as image_tokenizer_lib
from avg_jax.models import query_head as query_head_lib
from avg_jax.models.t5_config import T5Config
from avg_jax.vokens import VokenVocabulary


def write_export(
  directory: str,
  *,
  params: Any,
  cfg: T5Config,
  vocab: VokenVocabulary,
  image_ids: np.ndarray,
  codes: np.ndarray,
  file_names: Sequence[str],
  tokenizer: TextTokenizer,
  decode: dict,
  limits: dict,
  scheme: str,
  source_stage: str,
  config: dict,
  config_hash: str = "",
  param_dtype: str = "float32",
  gallery: tuple | None = None,
  dual_encoder: tuple | None = None,
  image_tokenizer: tuple | None = None,
  live: dict | None = None,
  query_head: Any = None,
) -> None:
  """Writes the serving checkpoint into `directory` atomically (temp folder, then rename).

  `decode`: `DecodeConfig.to_dict()` (the generator's trained_length set). `limits`:
  max_length (tokens), max_query_chars, batch_buckets. `gallery`: optional `(entries,
  thumbnail_size)` for `gallery.write` (thumbnails and captions of the indexed images).
  `dual_encoder`: optional `(workdir, image ids [N], image embeddings [N, D])`: the workdir's
  dual encoder is copied in with the indexed images' embeddings (None, None: the encoder
  alone). `image_tokenizer`: optional `(RQVAEConfig, params, batch_stats)` of the frozen RQ
  tokenizer; with the dual encoder and `live` (how `prepare` stored images: image_size,
  image_encoding, jpeg_quality) new images can be added live. `codes [N, T]` are the
  identifiers the generator emits (T = `decode["trained_length"]`: all positions, or the
  semantic codes alone). `query_head`: avg_hybrid's `models.query_head.QueryHead`
  (`decode.hybrid_query="generator"`).
  """
  directory = os.path.abspath(directory)
  # One name every process knows: all of them join the orbax save into it.
  tmp = directory + ".tmp"
  writer = processes.is_main()  # every process joins the orbax save; one writes the rest
  if writer:
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
  processes.barrier("export: temp folder ready")
  try:
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[param_dtype]
    stored = jax.tree.map(lambda x: x.astype(dtype), params)
    checkpoints.write_pytree(os.path.join(tmp, exports.PARAMS), stored)
    if writer:
      codes = np.asarray(codes)
      trie = VokenTrie.build(
        codes, image_ids, position_sizes=vocab.position_sizes()[: codes.shape[1]]
      )
      trie.save(os.path.join(tmp, exports.TRIE))
      exports.write_table(tmp, image_ids, codes, file_names)
      io.write_bytes(os.path.join(tmp, exports.TOKENIZER), tokenizer.model_proto)
      io.write_json(os.path.join(tmp, exports.CONFIG), config, sort_keys=True)
      if gallery is not None:
        gallery_lib.write(tmp, *gallery)
      if dual_encoder is not None:
        source, emb_ids, emb = dual_encoder
        store.copy_encoder(source, os.path.join(tmp, exports.DUAL_ENCODER))
        if emb is not None:
          exports.write_image_embeddings(tmp, emb_ids, emb)
      if query_head is not None:
        query_head_lib.save(os.path.join(tmp, exports.QUERY_HEAD), query_head)
      if image_tokenizer is not None:
        image_tokenizer_lib.save(os.path.join(tmp, exports.IMAGE_TOKENIZER), *image_tokenizer)
      exports.write_manifest(
        tmp,
        {
          "avg_jax_version": avg_jax.__version__,
          "scheme": scheme,
          "source_stage": source_stage,
          "param_dtype": param_dtype,
          "config_hash": config_hash,
          "num_images": int(len(image_ids)),
          "t5": dataclasses.asdict(cfg),
          "vocab": vocab.to_dict(),
          "decode": dict(decode),
          "limits": dict(limits),
          **({"live": dict(live)} if live is not None else {}),
        },
      )
      checksums.write(tmp)  # last: the record of every file, manifest included
      io.replace_dir(tmp, directory)
  except BaseException as e:
    # Whatever stopped it (a full disk, Ctrl-C), the half-written folder goes: on a full
    # disk it holds the space the user must free.
    if writer:
      shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, Exception) and io.disk_full(e):
      raise UserError(
        f"export: no space left on device writing {directory}; free space and rerun"
      ) from e
    raise
  processes.barrier("export: written")
