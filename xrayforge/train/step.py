"""One PGGAN training step (D then G, WGAN-GP), shared by the trainer and the benchmarks."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .losses import discriminator_loss, generator_loss, gp_norm_scale, gradient_penalty

try:
    import nvtx
    _range = nvtx.annotate
except ImportError:  # optional: ranges only matter under Nsight Systems
    def _range(message=None, **kwargs):
        return contextlib.nullcontext()


def make_adam(params, lr: float = 1e-3) -> torch.optim.Adam:
    """Adam as in PGGAN: lr 1e-3, betas (0, 0.99), eps 1e-8 (fused on CUDA)."""
    params = [p for p in params if p.requires_grad]
    fused = bool(params) and params[0].is_cuda
    return torch.optim.Adam(params, lr=lr, betas=(0.0, 0.99), eps=1e-8, fused=fused)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, beta: float = 0.999) -> None:
    """ema <- beta * ema + (1 - beta) * model, for every floating parameter and buffer."""
    e_params = [p for p in ema.parameters()]
    m_params = [p for p in model.parameters()]
    torch._foreach_lerp_(e_params, m_params, 1.0 - beta)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)
    ema.level = model.level
    ema._alpha_value = model._alpha_value


def ema_beta(batch: int, half_life_images: float, images_seen: int | None = None,
             rampup: float | None = None) -> float:
    """Per-step EMA decay for a half-life in images: 0.5 ** (batch / half_life). With ``rampup``
    (NVIDIA's later code; 0.05 there) the half-life is at most ``rampup × images_seen``, so that
    early in a run G_ema follows G instead of averaging in the random initial weights."""
    half_life = half_life_images
    if rampup and images_seen is not None:
        half_life = min(half_life, images_seen * rampup)
    return 0.5 ** (batch / half_life) if half_life > 0 else 0.0


@dataclass
class StepConfig:
    gp_weight: float = 10.0
    gp_metric: str = "current"             # "full": the official PGGAN's metric (see losses.gp_norm_scale)
    drift: float = 0.001
    ema_beta: float = 0.999                # per step, unless the call gives one
    amp_dtype: torch.dtype | None = None   # torch.bfloat16 for mixed precision
    accumulation: int = 1                  # micro-batches per optimiser step


class PGGANStep:
    """Runs D's update then G's on one minibatch of real images; returns loss tensors (no host sync)."""

    def __init__(self, G, D, G_ema, opt_g, opt_d, config: StepConfig | None = None, grad_sync=None):
        self.G, self.D, self.G_ema, self.opt_g, self.opt_d = G, D, G_ema, opt_g, opt_d
        self.config = config or StepConfig()
        self.grad_sync = grad_sync  # e.g. an all-reduce of the gradients across processes
        # optional: an object whose phase(name) is a context manager timing that part of the step
        # (the benchmarks' per-phase breakdown); None costs nothing
        self.phase_timer = None

    def _phase(self, name: str):
        if self.phase_timer is None:
            return contextlib.nullcontext()
        return self.phase_timer.phase(name)

    def _autocast(self, device: torch.device):
        dtype = self.config.amp_dtype
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def _micro_batches(self, real: torch.Tensor) -> list[torch.Tensor]:
        """Micro-batch k holds samples k, k + A, k + 2A, ...: D's minibatch-stddev groups are strided
        (sample i in group i % (N // G)), so each group of the full batch stays whole in one micro-batch
        and the accumulated step is the full batch's (consecutive chunks regrouped the samples)."""
        a = self.config.accumulation
        if a == 1:
            return [real]
        if getattr(getattr(self.D, "config", None), "mbstd_mode", "official") == "gan_zoo":
            # pytorch_GAN_zoo's D groups consecutive samples: consecutive micro-batches keep them whole
            return list(real.chunk(a))
        fmt = torch.channels_last if real.dim() == 4 and not real.is_contiguous() \
            and real.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return [real[k::a].contiguous(memory_format=fmt) for k in range(min(a, real.shape[0]))]

    def _latents(self, n: int, device, generator):
        return torch.randn(n, self.G.config.latent_dim, device=device, generator=generator)

    def __call__(self, real: torch.Tensor, level: int, alpha, generator: torch.Generator | None = None,
                 ema_beta: float | None = None) -> dict:
        cfg, device = self.config, real.device
        gp_scale = gp_norm_scale(cfg.gp_metric, level, self.G.config.num_levels - 1)
        chunks = self._micro_batches(real)
        out = {}
        with _range("D step"):
            self.opt_d.zero_grad(set_to_none=True)
            d_total = torch.zeros((), device=device)
            logged = {k: torch.zeros((), device=device) for k in ("gp", "real_score", "fake_score")}
            for chunk in chunks:
                with self._autocast(device):
                    with self._phase("G forward (for D)"), torch.no_grad():
                        fake = self.G(self._latents(chunk.shape[0], device, generator), level, alpha)
                    with self._phase("D on reals"):
                        real_scores = self.D(chunk, level, alpha)
                    with self._phase("D on fakes"):
                        fake_scores = self.D(fake, level, alpha)
                    with self._phase("gradient penalty (D + grad)"):
                        penalty = gradient_penalty(self.D, chunk, fake, level, alpha, generator, gp_scale)
                    loss = discriminator_loss(real_scores, fake_scores, penalty, cfg.gp_weight, cfg.drift)
                with self._phase("D backward (with double backward)"):
                    (loss / len(chunks)).backward()
                d_total = d_total + loss.detach() / len(chunks)
                # the full batch's, as d_loss (equal micro-batches: the mean of their means)
                for k, v in (("gp", penalty), ("real_score", real_scores), ("fake_score", fake_scores)):
                    logged[k] = logged[k] + v.detach().float().mean() / len(chunks)
            out.update(logged)
            with self._phase("D optimiser"):
                if self.grad_sync is not None:
                    self.grad_sync(self.D)
                self.opt_d.step()
            out["d_loss"] = d_total
        with _range("G step"):
            self.opt_g.zero_grad(set_to_none=True)
            self.D.requires_grad_(False)
            g_total = torch.zeros((), device=device)
            try:
                for chunk in chunks:
                    with self._autocast(device):
                        with self._phase("G forward"):
                            fake = self.G(self._latents(chunk.shape[0], device, generator), level, alpha)
                        with self._phase("D on fakes (for G)"):
                            loss = generator_loss(self.D(fake, level, alpha))
                    with self._phase("G backward (through D)"):
                        (loss / len(chunks)).backward()
                    g_total = g_total + loss.detach() / len(chunks)
            finally:
                self.D.requires_grad_(True)
            with self._phase("G optimiser"):
                if self.grad_sync is not None:
                    self.grad_sync(self.G)
                self.opt_g.step()
            out["g_loss"] = g_total
        with _range("EMA"), self._phase("EMA"):
            ema_update(self.G_ema, self.G, cfg.ema_beta if ema_beta is None else ema_beta)
        return out
