"""Optimisers and learning-rate schedules shared by every training stage."""

import dataclasses
from collections.abc import Callable

import optax


def warmup_linear_schedule(
  peak: float, total_steps: int, warmup_steps: int, end_fraction: float = 0.0
) -> optax.Schedule:
  """Linear warmup from 0 to `peak` over `warmup_steps`, then linear decay to `peak*end`."""
  warmup_steps = max(int(warmup_steps), 1)
  decay_steps = max(int(total_steps) - warmup_steps, 1)
  return optax.join_schedules(
    [
      optax.linear_schedule(0.0, peak, warmup_steps),
      optax.linear_schedule(peak, peak * end_fraction, decay_steps),
    ],
    [warmup_steps],
  )


def warmup_cosine_schedule(peak: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
  """Linear warmup then cosine decay to 0."""
  return optax.warmup_cosine_decay_schedule(
    0.0, peak, max(int(warmup_steps), 1), max(int(total_steps), 2)
  )


def adamw(
  schedule: optax.Schedule | float,
  *,
  weight_decay: float = 0.0,
  grad_clip_norm: float = 0.0,
  accumulation_steps: int = 1,
  mask: Callable | None = None,
) -> optax.GradientTransformation:
  """AdamW with optional global-norm clipping and gradient accumulation (`optax.MultiSteps`)."""
  parts = []
  if grad_clip_norm and grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(grad_clip_norm))
  parts.append(optax.adamw(schedule, weight_decay=weight_decay, mask=mask))
  tx = optax.chain(*parts)
  if accumulation_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accumulation_steps)
  return tx


@dataclasses.dataclass(frozen=True)
class AdamWSchedule:
  """`adamw` over `warmup_linear_schedule` as one hashable value: a step function can take it
  as a jit static argument and build the optimizer inside the program."""

  learning_rate: float
  steps: int
  warmup_steps: int
  end_fraction: float = 0.0
  weight_decay: float = 0.0
  grad_clip_norm: float = 0.0
  accumulation_steps: int = 1

  def build(self) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`(tx, schedule)`."""
    schedule = warmup_linear_schedule(
      self.learning_rate, self.steps, self.warmup_steps, self.end_fraction
    )
    return adamw(
      schedule,
      weight_decay=self.weight_decay,
      grad_clip_norm=self.grad_clip_norm,
      accumulation_steps=self.accumulation_steps,
    ), schedule
