"""Initial T5 parameters for training: scratch or Hugging Face import, plus voken rows.

One call gives the config and sharded parameters the generative stage starts from:
`cfg, params, shardings = initial_params(config.t5, vocab, codebook, mesh, rng)`.
"""

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from avg_jax import partitioning
from avg_jax.models import t5, t5_hf, voken_rows
from avg_jax.models.t5_config import T5Config
from avg_jax.vokens import VokenVocabulary


def initial_params(
  section: Mapping[str, Any],
  vocab: VokenVocabulary,
  codebook: np.ndarray | None,
  mesh,
  rng: jax.Array,
  *,
  seed: int = 0,
) -> tuple[T5Config, dict, dict]:
  """`(cfg, params, param_shardings)` with params sharded on `mesh` by the logical rules.

  `section` is the `t5` config section. With `section.pretrained_path`, the Hugging Face
  checkpoint is read on every host and voken rows are appended (avg_jax/models/voken_rows.py);
  otherwise parameters are initialised already sharded and the voken rows overwritten.
  `codebook float[num_level_tokens, e_dim]` (voken table's codebook.npy) is needed when
  `section.voken_init == "codebook"`.
  """
  cfg = T5Config.from_config(section, vocab)
  shardings = t5.param_shardings(cfg, mesh)["params"]
  init = section["voken_init"]
  if section.get("pretrained_path"):
    text_cfg, host = t5_hf.load_hf_t5(
      section["pretrained_path"],
      dropout_rate=cfg.dropout_rate,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      remat=cfg.remat,
      scan_layers=cfg.scan_layers,
    )
    full_cfg, host = voken_rows.append_voken_rows(
      host, text_cfg, vocab, codebook, init=init, seed=seed
    )
    if full_cfg != cfg:  # a bug, not a user error: both come from the same sources
      raise AssertionError(f"config mismatch after import: {full_cfg} != {cfg}")
    return cfg, jax.device_put(host, shardings), shardings
  variables, _ = partitioning.sharded_init(t5.init_variables, mesh, rng, static=(cfg,))
  params = voken_rows.set_voken_rows(
    variables["params"], cfg, vocab, codebook, init=init, seed=seed
  )
  return cfg, jax.device_put(params, shardings), shardings
