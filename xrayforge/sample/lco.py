"""Latent class optimisation (LCO): steer an unconditional generator's latents with a
classifier until the image shows a wanted combination of findings (Segal et al. 2021).

A target maps findings to 1 (present) or 0 (absent); findings it does not name are free.
A batch of latents is optimised with Adam on BCE(classifier(G(z)), target) over the named
findings plus a prior term ``prior_weight * (|z| - sqrt(d))² / d`` that keeps z on the shell
where N(0, I) puts its mass (with a truncation T, the truncated normal's shell, and every
component kept within ±T). A sample is accepted as soon as every named finding passes its
threshold (p >= t for present, p < t for absent) and then stops moving; samples still short
after ``steps`` are rejected and counted. Targets are mixed freely within a batch.

``LCOPool`` runs a stream of latents a batch at a time, a finished one making room for the next
(the archive writer's path); ``optimise`` is one batch of it. ``screen_starts`` picks each
sample's starting point as the best of S draws from N(0, I) for its target, with forward passes
only (no backward): on the demo's generator S = 16 cut the G + classifier passes per accepted
image 1.6–3.3× and z moved less (``benchmarks/lco.py --starts``).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def parse_target(text: str, findings) -> dict[str, int]:
    """'Cardiomegaly=1,Effusion=1,Nodule=0' -> {'Cardiomegaly': 1, 'Effusion': 1, 'Nodule': 0}."""
    findings = list(findings)
    known = ", ".join(findings)
    out = {}
    if not text or not text.strip():
        raise ValueError(f"empty LCO target; write e.g. 'Cardiomegaly=1,Nodule=0' with findings from: {known}")
    for item in text.split(","):
        item = item.strip()
        if "=" not in item:
            raise ValueError(f"bad LCO target item {item!r} in {text!r}: expected NAME=1 or NAME=0 "
                             f"(known findings: {known})")
        name, value = (s.strip() for s in item.split("=", 1))
        if name not in findings:
            raise ValueError(f"unknown finding {name!r} in {text!r}; known findings: {known}")
        if value not in ("0", "1"):
            raise ValueError(f"finding {name!r} must be =1 (present) or =0 (absent), got {value!r}")
        if name in out:
            raise ValueError(f"finding {name!r} appears twice in {text!r}")
        out[name] = int(value)
    return out


def format_target(target: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in target.items())


def target_tensors(target: dict, findings, thresholds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, mask, thresholds) over all findings for one target. The thresholds are float64, the
    classifier's own numbers: in float32 a threshold such as 0.7 would drop to 0.69999999, and a
    probability between the two would pass as present (and fail as absent) where the classifier's
    call (p >= 0.7) says otherwise."""
    findings = list(findings)
    values, mask = torch.zeros(len(findings)), torch.zeros(len(findings))
    for name, v in target.items():
        values[findings.index(name)], mask[findings.index(name)] = float(v), 1.0
    return values, mask, torch.tensor([float(thresholds(f)) for f in findings], dtype=torch.float64)


def satisfied(probs: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    ok = torch.where(values > 0.5, probs >= thr, probs < thr)
    return (ok | (mask < 0.5)).all(dim=1)


def log_prior(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) per sample."""
    d = z.shape[1]
    return -0.5 * z.square().sum(1) - 0.5 * d * math.log(2 * math.pi)


@dataclass
class LCOResult:
    z: torch.Tensor            # final latents (N, d)
    images: torch.Tensor       # G(z) in [-1, 1]
    probs: torch.Tensor        # classifier probabilities (N, F)
    accepted: torch.Tensor     # bool (N,)
    steps: torch.Tensor        # optimisation steps used (N,)
    log_prior_start: torch.Tensor
    log_prior_end: torch.Tensor
    cosine_moved: torch.Tensor  # cosine similarity between start and end latents
    evaluations: int = 0       # latents that went through G and the classifier (each active one once per step)


def shell_radius(d: int, truncation: float | None = None) -> float:
    """Where the latents' norm concentrates: sqrt(d) for N(0, I); with ``truncation`` T (components
    redrawn beyond ±T) sqrt(d · v), v = 1 - 2Tφ(T) / (2Φ(T) - 1) the variance of the standard normal
    truncated to [-T, T]."""
    if truncation is None:
        return math.sqrt(d)
    t = float(truncation)
    mass = math.erf(t / math.sqrt(2))  # 2Φ(T) - 1
    return math.sqrt(d * (1 - 2 * t * math.exp(-t * t / 2) / math.sqrt(2 * math.pi) / mass))


def lco_loss(logits: torch.Tensor, z: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
             prior_weight: float, radius: float | None = None) -> torch.Tensor:
    """Per-sample LCO objective: mean BCE over the named findings + the shell prior, which holds
    |z| near ``radius`` (default sqrt(d); ``shell_radius``). A finding the target does not name
    plays no part, whatever the classifier says of it (an infinite or NaN logit there gave a NaN
    objective: 0 · inf)."""
    named = mask > 0.5
    bce = F.binary_cross_entropy_with_logits(torch.where(named, logits, 0), values, reduction="none")
    loss_cls = torch.where(named, bce, 0).sum(1) / mask.sum(1).clamp_min(1)
    radius = math.sqrt(z.shape[1]) if radius is None else radius
    return loss_cls + prior_weight * (z.norm(dim=1) - radius).square() / z.shape[1]


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 (autocast may give bf16 / fp16; float64 models stay float64)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _autocast(device: torch.device, amp_dtype):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else torch.autocast(device.type, enabled=False)


@contextmanager
def fixed_networks(*nets):
    """G and the classifier as fixed functions while LCO runs them: every module in eval mode (batch
    norm on its running statistics, neither this batch's, which would tie a latent's path to its
    batch mates, nor updating them; no dropout), each module's own mode given back afterwards.
    Their parameters get no gradients either way: LCO differentiates with respect to z only."""
    mods = [m for net in nets if isinstance(net, torch.nn.Module) for m in net.modules()]
    modes = [m.training for m in mods]
    try:
        for m in mods:
            m.training = False
        yield
    finally:
        for m, mode in zip(mods, modes):
            m.training = mode


@torch.no_grad()
def screen_starts(G, classifier, candidates: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                  prior_weight: float = 1.0, amp_dtype=None, batch: int = 256,
                  thresholds: torch.Tensor | None = None, truncation: float | None = None) -> torch.Tensor:
    """Best-of-S starting points: ``candidates`` (N, S, d) are S draws from N(0, I) per sample;
    each goes through G and the classifier once (forward only, about a third of an LCO step) and
    the one with the lowest LCO objective for its row's target is returned, as an index (N,) into S.
    With ``thresholds`` (N, F) a draw that already shows the target comes first (``optimise``
    accepts it at step 0), whatever its objective. ``batch``: draws per forward pass. One draw
    per sample (S = 1) is chosen without any pass. ``truncation``: the draws' (the prior's radius)."""
    n, s, d = candidates.shape
    if s == 1:
        return torch.zeros(n, dtype=torch.long, device=candidates.device)
    flat = candidates.reshape(n * s, d)
    v, m = (t.to(flat.device).repeat_interleave(s, dim=0) for t in (values, mask))
    thr = thresholds.to(flat.device).repeat_interleave(s, dim=0) if thresholds is not None else None
    radius = shell_radius(d, truncation)
    scores = torch.empty(n * s, dtype=torch.float64, device=flat.device)
    ok = torch.zeros(n * s, dtype=torch.bool, device=flat.device)
    with _autocast(flat.device, amp_dtype), fixed_networks(G, classifier):
        for i in range(0, n * s, batch):
            logits = _wide(classifier(G(flat[i:i + batch])))
            scores[i:i + batch] = lco_loss(logits, flat[i:i + batch], v[i:i + batch], m[i:i + batch], prior_weight,
                                           radius)
            if thr is not None:
                ok[i:i + batch] = satisfied(torch.sigmoid(logits), v[i:i + batch], m[i:i + batch], thr[i:i + batch])
    # a draw the classifier cannot score (NaN: argmin would take it as the best) ranks last; draws
    # that meet the target rank before every draw that does not (an infinite score among them
    # would have made the offset 0 * inf = NaN for every row of the screen)
    order = scores.nan_to_num(nan=math.inf).view(n, s).argsort(dim=1, stable=True)
    first = ok.view(n, s).gather(1, order).to(torch.uint8).argmax(dim=1)  # the best that meets it; else 0: the best
    return order.gather(1, first[:, None]).squeeze(1)


@dataclass
class LCOSample:
    """One latent that has left an ``LCOPool``: accepted, or out of steps."""
    key: object
    z0: torch.Tensor           # the start (d,)
    z: torch.Tensor            # where it ended (d,)
    image: torch.Tensor        # G(z)
    probs: torch.Tensor        # classifier probabilities (F,)
    accepted: bool
    steps: int                 # optimisation steps taken


class LCOPool:
    """LCO on a stream of latents, ``capacity`` at a time: a latent leaves as soon as it meets its
    target (accepted) or has had ``steps`` steps and still does not (rejected), and the next one from
    the feed takes its place, so each evaluation runs a full batch while the feed lasts. Each row has
    its own Adam state (betas 0.9 / 0.999, eps 1e-8, as torch.optim.Adam computes it) and its own step
    count, so a latent's path is that of LCO on it alone (up to the last bits of float32 arithmetic,
    which a batch's size may change), whatever shares its batch.

    ``truncation`` T (latents drawn with components within ±T): every step keeps them there (each
    component clamped to ±T) and the prior holds |z| at the truncated normal's radius, so an
    optimised latent stays in the truncated distribution's support; without it the prior's pull to
    sqrt(d) took latents drawn at T = 0.5 to components of 1.5–2.2.

    ``written(images) -> probabilities`` (optional): the classifier's probabilities of images as
    they will be stored (e.g. clamped and quantised to a file's bits). A row whose image meets its
    target is then accepted only if its stored image does too, and otherwise takes another step; the
    rows that met their target in one evaluation are checked together, as one batch, and their
    sample's ``probs`` are the stored image's."""

    beta1, beta2, eps = 0.9, 0.999, 1e-8

    def __init__(self, G, classifier, capacity: int, steps: int = 100, lr: float = 0.05, prior_weight: float = 1.0,
                 amp_dtype=None, truncation: float | None = None, written=None):
        if capacity < 1 or steps < 0:
            raise ValueError(f"LCO needs capacity >= 1 and steps >= 0, got {capacity} and {steps}")
        self.G, self.classifier, self.capacity, self.steps = G, classifier, capacity, steps
        self.lr, self.prior_weight, self.amp_dtype = lr, prior_weight, amp_dtype
        self.truncation, self.written = truncation, written
        self.evaluations = 0  # latents that went through G and the classifier (each in the pool once per step)

    def run(self, feed, keep=None):
        """Yield an LCOSample for every latent of ``feed``, an iterable of (key, z0 (d,), values (F,),
        mask (F,), thresholds (F,)), in the order they finish. ``keep(key)``: False drops a latent,
        unfinished and unreported, before its next evaluation (and skips it in the feed): e.g. one
        whose target already has all the images it needs. Works under a caller's no_grad or
        inference_mode (it makes its own gradients)."""
        yield from self._run(iter(feed), keep or (lambda key: True))

    @torch.inference_mode(False)
    @torch.enable_grad()  # as decorators they hold at each resumption, not while the caller runs
    def _run(self, feed, keep):
        keys: list = []
        state = None  # z0, z, m1, m2 (P, d); values, mask, thr (P, F); t (P,): the rows in the pool
        fed_out = False
        while True:
            if keys:  # first drop what the caller no longer wants, then fill the room it leaves
                kept = [i for i, k in enumerate(keys) if keep(k)]
                if len(kept) < len(keys):
                    index = torch.tensor(kept, dtype=torch.long, device=state[0].device)
                    state = [x[index] for x in state]
                    keys = [keys[i] for i in kept]
            fresh = []
            while not fed_out and len(keys) + len(fresh) < self.capacity:
                item = next(feed, None)
                if item is None:
                    fed_out = True
                elif keep(item[0]):
                    fresh.append(item)
            if fresh:
                z0 = torch.stack([item[1].detach() for item in fresh])
                dev = z0.device
                work = torch.promote_types(z0.dtype, torch.float32)  # Adam's state: never in bf16 / fp16
                z0 = z0.to(work).clone()
                rows = [z0, z0.clone(), torch.zeros_like(z0), torch.zeros_like(z0)] + \
                    [torch.stack([item[i].to(dev) for item in fresh]).to(work) for i in (2, 3)] + \
                    [torch.stack([item[4].to(dev) for item in fresh]).to(torch.float64),
                     torch.zeros(len(fresh), dtype=torch.long, device=dev)]
                state = rows if not keys else [torch.cat([a, b]) for a, b in zip(state, rows)]
                keys = keys + [item[0] for item in fresh]
            if not keys:
                return
            state, keys = yield from self._step(keys, state)

    def _step(self, keys, state):
        """One evaluation of every row; yields the rows that finish, returns (state, keys) of the rest."""
        z0, z, m1, m2, values, mask, thr, t = state
        za = z.detach().requires_grad_(True)
        with _autocast(za.device, self.amp_dtype), fixed_networks(self.G, self.classifier):
            imgs = self.G(za)
            logits = _wide(self.classifier(imgs))
        self.evaluations += len(keys)
        probs = torch.sigmoid(logits.detach())
        ok = satisfied(probs, values, mask, thr)
        if self.written is not None and bool(ok.any()):  # met as G gave them: are they met as stored?
            met = ok.nonzero().squeeze(1)
            with fixed_networks(self.G, self.classifier):
                stored = self.written(imgs.detach()[met]).to(probs)
            probs = probs.index_copy(0, met, stored)
            ok = ok.index_copy(0, met, satisfied(stored, values[met], mask[met], thr[met]))
        finished = ok | (t >= self.steps)
        fin = finished.tolist()
        live = [i for i, f in enumerate(fin) if not f]
        done = [i for i, f in enumerate(fin) if f]
        out_state = None
        if live:  # queue the update of the rows that go on before the host handles the finished ones
            rest = torch.tensor(live, dtype=torch.long, device=z.device) if done else None
            loss = lco_loss(logits, za, values, mask, self.prior_weight, shell_radius(za.shape[1], self.truncation))
            (grad,) = torch.autograd.grad((loss[rest] if rest is not None else loss).sum(), za)
            sel = (lambda x: x[rest]) if rest is not None else (lambda x: x)
            z0_l, z_l, m1, m2, values_l, mask_l, thr_l, t_l = (sel(x) for x in (z0, z.detach(), m1, m2, values,
                                                                                 mask, thr, t))
            g = sel(grad)
            with torch.no_grad():  # Adam, as torch.optim.Adam computes it, per row with its own step count
                t_l = t_l + 1
                tf = t_l.to(torch.float64)[:, None]  # bias corrections in float64, as Python floats would be
                m1 = m1.mul(self.beta1).add_(g, alpha=1 - self.beta1)
                m2 = m2.mul(self.beta2).addcmul_(g, g, value=1 - self.beta2)
                bc2_sqrt = (1 - self.beta2 ** tf).sqrt().to(z_l.dtype)
                step_size = (self.lr / (1 - self.beta1 ** tf)).to(z_l.dtype)
                z_l = z_l - step_size * m1 / (m2.sqrt() / bc2_sqrt).add_(self.eps)
                if self.truncation is not None:
                    z_l = z_l.clamp_(-self.truncation, self.truncation)
            out_state = [z0_l, z_l, m1, m2, values_l, mask_l, thr_l, t_l]
        if done:  # only the finished rows are gathered: a sample must not hold its whole step's batch
            index = torch.tensor(done, dtype=torch.long, device=z.device)
            imgs_f, probs_f = _wide(imgs.detach()[index]), probs[index]
            z_f, z0_f = z.detach()[index], z0[index]
            ok_list, t_list = ok[index].tolist(), t[index].tolist()
            for j, i in enumerate(done):
                yield LCOSample(keys[i], z0_f[j], z_f[j], imgs_f[j], probs_f[j], bool(ok_list[j]), int(t_list[j]))
        return out_state, [keys[i] for i in live]


def optimise(G, classifier, z0: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, thresholds: torch.Tensor,
             steps: int = 100, lr: float = 0.05, prior_weight: float = 1.0, amp_dtype=None,
             truncation: float | None = None, written=None) -> LCOResult:
    """Run LCO on a batch; ``values``/``mask``/``thresholds`` are (N, F) (one target per row).

    An ``LCOPool`` as large as the batch: only the latents still short of their target go
    through G and the classifier at each step (the batch shrinks as samples are accepted), each
    with its own Adam state. Works under a caller's no_grad or inference_mode. ``written``: as
    ``LCOPool``'s (accept an image only if it meets its target as stored)."""
    n = z0.shape[0]
    pool = LCOPool(G, classifier, max(n, 1), steps, lr, prior_weight, amp_dtype, truncation, written)
    dev = z0.device
    feed = ((i, z0[i], values[i].to(dev), mask[i].to(dev), thresholds[i].to(dev)) for i in range(n))
    out = sorted(pool.run(feed), key=lambda smp: smp.key)
    with torch.inference_mode(False):
        z0c = z0.detach().clone()
        z = torch.stack([smp.z for smp in out]) if out else z0c.clone()
        return LCOResult(z, torch.stack([smp.image for smp in out]) if out else None,
                         torch.stack([smp.probs for smp in out]) if out else None,
                         torch.tensor([smp.accepted for smp in out], dtype=torch.bool, device=dev),
                         torch.tensor([smp.steps for smp in out], dtype=torch.long, device=dev),
                         log_prior(z0c), log_prior(z), F.cosine_similarity(z0c, z, dim=1), pool.evaluations)
