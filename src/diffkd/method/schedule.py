"""DDIM noise schedule for DiffKD: β schedules, ᾱ as fp32 buffers, and the per-step DDIM coefficients.

The official code wraps a trimmed copy of diffusers' ``DDIMScheduler``; this module keeps its numbers
(β 1e-4 → 0.02 linear over 1000 steps, ``set_alpha_to_one=True``, η = 0, ε-prediction) and fixes its hazards
(spec §F.2): the constants are registered fp32 buffers that follow ``.to(device)`` and never change dtype, and
the DDIM update is precomputed per step as two Python floats, so the denoising loop does no tensor indexing and
no host synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["BETA_SCHEDULES", "DDIMSchedule", "DDIMStep", "make_betas"]

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
BETA_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2")


def make_betas(
    schedule: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Tensor:
    """β_t for t = 0..T-1 as a float32 tensor (T,), computed exactly like diffusers/the official code.

    - ``linear``: ``linspace(beta_start, beta_end, T)`` in float32.
    - ``scaled_linear``: ``linspace(√beta_start, √beta_end, T) ** 2``.
    - ``squaredcos_cap_v2``: the Glide cosine schedule, β_t = min(1 − ᾱ(t+1)/ᾱ(t), 0.999) with
      ᾱ(t) = cos²((t/T + 0.008)/1.008 · π/2).
    """
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if schedule == "squaredcos_cap_v2":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [
            min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), 0.999)
            for i in range(num_train_timesteps)
        ]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(f"unknown beta_schedule {schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")


@dataclass(frozen=True)
class DDIMStep:
    """One deterministic DDIM step t → t_prev as ``x_prev = a·x + b·ε̂`` (η = 0, ε-prediction).

    ``alpha_prod_prev`` is 1.0 when ``t_prev < 0`` (``set_alpha_to_one``), so the last step returns x̂0.
    """

    t: int
    t_prev: int
    alpha_prod: float
    alpha_prod_prev: float
    a: float
    b: float


class DDIMSchedule(nn.Module):
    """Noise schedule + deterministic DDIM sampler coefficients.

    Args:
        num_train_timesteps: T, the number of diffusion training steps (official: 1000).
        beta_schedule: ``linear`` (official), ``scaled_linear`` or ``squaredcos_cap_v2``.
        beta_start, beta_end: β range of the linear schedules.
        inference_steps: N, the number of denoiser evaluations per refinement (official: 5).
        start_timestep: ``None`` reproduces the official rule — ``set_timesteps(2N)`` and keep the second half,
            i.e. t = 400, 300, 200, 100, 0 for N = 5. An int s instead evaluates at N timesteps evenly spaced
            from s down to 0 (``500`` is the paper's App. B.1 description: 500, 375, 250, 125, 0).

    Buffers (fp32, non-persistent, follow ``.to(device)``): ``betas`` (T,), ``alphas_cumprod`` (T,),
    ``sqrt_alphas_cumprod`` (T,), ``sqrt_one_minus_alphas_cumprod`` (T,).
    """

    betas: Tensor
    alphas_cumprod: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: BetaSchedule = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        inference_steps: int = 5,
        start_timestep: int | None = None,
    ) -> None:
        super().__init__()
        if inference_steps < 1:
            raise ValueError(f"inference_steps must be >= 1, got {inference_steps}")
        if start_timestep is not None and not 0 <= start_timestep < num_train_timesteps:
            raise ValueError(f"start_timestep must lie in [0, {num_train_timesteps}), got {start_timestep}")
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        self.inference_steps = inference_steps
        self.start_timestep = start_timestep
        betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # float32, like the official scheduler
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        self.register_buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt(), persistent=False)
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1 - alphas_cumprod).sqrt(), persistent=False)
        # Python floats computed once on the CPU: the sampling loop never touches a tensor for its constants.
        self.steps: tuple[DDIMStep, ...] = self._make_steps(alphas_cumprod.double().tolist())

    def _apply(self, fn, recurse=True):  # keep the schedule fp32 whatever `.to(dtype)` / `.half()` asks
        super()._apply(fn, recurse)
        for name in ("betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
            buf = getattr(self, name)
            if buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        return self

    def timesteps(self) -> list[int]:
        """The timesteps at which the denoiser is evaluated, in order (e.g. [400, 300, 200, 100, 0])."""
        return [s.t for s in self.steps]

    def _make_steps(self, alphas_cumprod: list[float]) -> tuple[DDIMStep, ...]:
        T, N = self.num_train_timesteps, self.inference_steps
        if self.start_timestep is None:
            # diffusers set_timesteps(2N): step_ratio = T // 2N, timesteps = arange(2N)[::-1] * ratio;
            # DiffKD keeps the second half; each step's previous timestep is t - ratio.
            ratio = T // (2 * N)
            all_ts = [i * ratio for i in range(2 * N)][::-1]
            ts = all_ts[len(all_ts) // 2 :]
            prevs = [t - ratio for t in ts]
        else:
            s = self.start_timestep
            ts = [round(s - i * s / (N - 1)) for i in range(N)] if N > 1 else [s]
            prevs = [*ts[1:], -1]
        steps = []
        for t, tp in zip(ts, prevs):
            ab_t = alphas_cumprod[t]
            ab_p = alphas_cumprod[tp] if tp >= 0 else 1.0
            # x0 = (x - √(1-ᾱt) ε)/√ᾱt ; x_prev = √ᾱp x0 + √(1-ᾱp) ε   (η = 0; the official "clipped model
            # output" recompute of ε from x0 is the identity without clipping)
            a = math.sqrt(ab_p) / math.sqrt(ab_t)
            b = math.sqrt(1.0 - ab_p) - math.sqrt(ab_p) * math.sqrt(1.0 - ab_t) / math.sqrt(ab_t)
            steps.append(DDIMStep(t, tp, ab_t, ab_p, a, b))
        return tuple(steps)

    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """DDPM forward process ``x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε`` in fp32.

        Args:
            x0: clean sample (B, C, H, W), any float dtype.
            noise: ε, same shape as ``x0``.
            timesteps: (B,) int64 on the same device.
        Returns:
            (B, C, H, W) float32.
        """
        shape = (-1,) + (1,) * (x0.dim() - 1)
        sa = self.sqrt_alphas_cumprod[timesteps].view(shape)
        s1 = self.sqrt_one_minus_alphas_cumprod[timesteps].view(shape)
        return sa * x0.float() + s1 * noise.float()

    def extra_repr(self) -> str:
        return f"T={self.num_train_timesteps}, beta_schedule={self.beta_schedule!r}, timesteps={self.timesteps()}"
