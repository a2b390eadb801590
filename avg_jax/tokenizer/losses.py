"""RQ-VAE training losses: reconstruction, caption alignment (MSE or InfoNCE), quantisation.

    total = quant_weight * quant + recon_weight * MSE(decoded, image) + align_weight * align
    align = MSE(aligned, caption)                      (reference, "mse")
          | symmetric InfoNCE of cosine similarities   ("infonce", in-batch negatives)

`aligned` is the decoder output ("decoder", the reference's text_loss_pos="after") or the
encoder output ("latent", its "before"; needs e_dim equal to the embedding width). Every MSE is
a mean over all elements, as torch's `F.mse_loss`.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from avg_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class LossWeights:
  quant: float = 1.0
  recon: float = 1.0
  align: float = 1.0
  align_loss: str = "mse"  # "mse" | "infonce"
  align_position: str = "decoder"  # "decoder" | "latent"
  temperature: float = 0.07  # InfoNCE only

  @classmethod
  def from_config(cls, tok: Any, scheme: str) -> "LossWeights":
    """Weights from the `tokenizer` section; the `rq` scheme has no alignment term (ablation)."""
    if tok.align_loss not in ("mse", "infonce"):
      raise UserError(
        f"config key tokenizer.align_loss must be 'mse' or 'infonce', got {tok.align_loss!r}"
      )
    if tok.align_position not in ("decoder", "latent"):
      raise UserError(
        f"config key tokenizer.align_position must be 'decoder' or 'latent', "
        f"got {tok.align_position!r}"
      )
    return cls(
      quant=float(tok.quant_weight),
      recon=float(tok.recon_weight),
      align=0.0 if scheme == "rq" else float(tok.align_weight),
      align_loss=str(tok.align_loss),
      align_position=str(tok.align_position),
      temperature=float(tok.infonce_temperature),
    )


def mse(a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean over all elements of `(a - b)^2`."""
  return jnp.mean(jnp.square(a - b))


def infonce(a: jax.Array, b: jax.Array, temperature: float) -> jax.Array:
  """Symmetric InfoNCE of `a [B, D]` against `b [B, D]`: row i of each is the positive pair."""
  eps = 1e-12
  a = a / (jnp.linalg.norm(a, axis=-1, keepdims=True) + eps)
  b = b / (jnp.linalg.norm(b, axis=-1, keepdims=True) + eps)
  logits = jnp.matmul(a, b.T) / temperature  # [B, B]
  labels = jnp.arange(a.shape[0])
  forward = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  backward = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
  return (jnp.mean(forward) + jnp.mean(backward)) / 2


def alignment_loss(aligned: jax.Array, caption: jax.Array, weights: LossWeights) -> jax.Array:
  """The caption-alignment term for `aligned [B, D]` and `caption [B, D]`."""
  if aligned.shape[-1] != caption.shape[-1]:
    raise UserError(
      f"tokenizer.align_position={weights.align_position!r} compares a "
      f"{aligned.shape[-1]}-d vector with {caption.shape[-1]}-d caption "
      f"embeddings; use align_position='decoder' or e_dim={caption.shape[-1]}"
    )
  if weights.align_loss == "infonce":
    return infonce(aligned, caption, weights.temperature)
  return mse(aligned, caption)


def total_loss(
  outputs: dict, image: jax.Array, caption: jax.Array, weights: LossWeights
) -> tuple[jax.Array, dict]:
  """`outputs` of `RQVAE.__call__`, `image [B, in]`, `caption [B, in]` -> (total, components)."""
  recon = mse(outputs["decoded"], image)
  aligned = outputs["decoded"] if weights.align_position == "decoder" else outputs["latent"]
  align = alignment_loss(aligned, caption, weights)
  quant = outputs["rq"].quant_loss
  total = weights.quant * quant + weights.recon * recon + weights.align * align
  return total, dict(loss=total, recon_loss=recon, align_loss=align, quant_loss=quant)
