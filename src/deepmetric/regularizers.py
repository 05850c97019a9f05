"""Regularisers: terms of a training objective that act beside a metric loss.

Contract: ``regularizer(step) -> scalar``, where ``step`` is the :class:`~deepmetric.step.StepInputs`
of the current training step (the loss's embeddings and labels, the embeddings before L2-normalisation,
the batch inputs, the model, the epoch). A regulariser takes only what it needs from it; nothing is
global. Regularisers that must act between steps override :meth:`Regularizer.on_epoch_end`, which the
trainer calls after every epoch; their state lives in buffers/sub-modules and is saved in checkpoints.

Configure them as terms of ``objective`` (``[{name: multi_similarity}, {name: sec, weight: 0.5}]``).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from deepmetric import distributed
from deepmetric.distances import as_compute_dtype
from deepmetric.errors import ConfigError
from deepmetric.losses.pair import NTXentLoss
from deepmetric.registry import Registry

if TYPE_CHECKING:
    from deepmetric.step import StepInputs

REGULARIZERS: Registry[nn.Module] = Registry("regularizer")
register = REGULARIZERS.register


class Regularizer(nn.Module):
    """Base class: ``forward(step) -> scalar``; ``on_epoch_end(model, epoch)`` runs after every epoch."""

    def forward(self, step: StepInputs) -> torch.Tensor:
        raise NotImplementedError

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        """Called by the trainer after epoch ``epoch`` (1-based) with the model being trained."""


@register("sec")
class SphericalEmbeddingConstraint(Regularizer):
    """SEC (Zhang, Li & Zhang, NeurIPS 2020): penalise the spread of the embedding norms.

    ``L = (1/B) Σ_i (‖x_i‖ − μ)²`` on the embeddings *before* L2-normalisation (the loss sees the
    normalised ones). ``μ`` is the batch mean norm, detached; with ``momentum ρ < 1`` it is an exponential
    moving average ``μ ← (1 − ρ) μ + ρ · mean_i ‖x_i‖`` (kept in a buffer; ρ = 1, the paper's default, is
    the batch mean). The paper weights it with η = 1 beside a triplet loss on CUB.
    """

    def __init__(self, momentum: float = 1.0):
        super().__init__()
        if not 0 < momentum <= 1:
            raise ConfigError(f"sec: momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum
        self.register_buffer("mean_norm", torch.tensor(float("nan")))

    def forward(self, step: StepInputs) -> torch.Tensor:
        norms = as_compute_dtype(step.raw).norm(dim=1)
        batch_mean = norms.detach().mean()
        if self.momentum < 1 and self.training:
            prev = self.mean_norm
            mu = batch_mean if torch.isnan(prev) else (1 - self.momentum) * prev + self.momentum * batch_mean
            self.mean_norm.copy_(mu)
        else:
            mu = batch_mean if self.momentum == 1 or torch.isnan(self.mean_norm) else self.mean_norm
        return ((norms - mu) ** 2).mean()


def listwise_kl(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                tau: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """``mean_i KL(p_i^T ‖ p_i^S)`` of LSD (Zeng et al. 2022) for L2-normalised embeddings ``[B, D]``.

    Each anchor's list holds its similarities to every item of the batch (itself included), those to
    other labels scaled by ``beta``; ``p = softmax(list / tau)``. The teacher is detached. Similarities
    and the log-softmax are computed in float32 (or float64 for float64 inputs), with autocast disabled.
    """
    with torch.autocast(student.device.type, enabled=False):
        s = as_compute_dtype(student)
        dtype = s.dtype
        t = teacher.detach().to(dtype)
        scale = torch.where(labels[:, None] == labels[None, :], 1.0, beta).to(dtype)
        log_ps = F.log_softmax(scale * (s @ s.T) / tau, dim=1)
        log_pt = F.log_softmax(scale * (t @ t.T) / tau, dim=1)
        return (log_pt.exp() * (log_pt - log_ps)).sum(1).mean()


@register("lsd")
class ListwiseSelfDistillation(Regularizer):
    """LSD (Zeng, Yang, Wang & Satoh 2022): distil the similarity lists of the previous epoch's model.

    ``L = (e / E) · α · τ² · mean_i KL(p_i^T ‖ p_i^S)`` (:func:`listwise_kl`), where the teacher is a frozen
    copy of the model taken at the end of the previous epoch and run on the same batch without gradient,
    ``e`` the 0-based epoch and ``E`` the number of epochs (the progressive ramp: zero in the first epoch).
    The public code leaves the other-label scale ``β`` (``kd_beta``) undefined; we use the paper's
    "standard" mode, β = 1. Defaults: τ = 1, α = 200 (the code's default; its triplet example uses 50).
    The weight of the ``lsd`` term in ``objective`` multiplies this (keep it 1 and set ``alpha``).
    """

    def __init__(self, model: nn.Module, alpha: float = 200.0, tau: float = 1.0, beta: float = 1.0):
        super().__init__()
        if tau <= 0 or alpha < 0:
            raise ConfigError(f"lsd: need tau > 0 and alpha >= 0, got tau={tau}, alpha={alpha}")
        self.alpha, self.tau, self.beta = alpha, tau, beta
        self.teacher = copy.deepcopy(model)
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    def train(self, mode: bool = True) -> ListwiseSelfDistillation:
        super().train(mode)
        self.teacher.eval()  # the teacher always predicts in inference mode
        return self

    def forward(self, step: StepInputs) -> torch.Tensor:
        ramp = (step.epoch - 1) / step.epochs
        if ramp == 0 or self.alpha == 0:
            return step.embeddings.sum() * 0.0  # zero, still attached to the graph
        real = ~step.is_synthetic
        with torch.no_grad():  # in a distributed run step.inputs are this rank's, the embeddings global
            teacher = distributed.all_gather(self.teacher(step.inputs))
        return ramp * self.alpha * self.tau**2 * listwise_kl(
            step.embeddings[real], teacher, step.labels[real], self.tau, self.beta
        )

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        self.teacher.load_state_dict(model.state_dict())

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, tau={self.tau}, beta={self.beta}"


@register("proximal")
class ProximalRegularizer(Regularizer):
    """The proximal term of alternating projections with fixed representatives (Can, Gürbüz & Alatan, ICIP
    2021) [recon]: ``½‖θ − θ̄‖²`` over the model's trainable parameters, where θ̄ is a copy of θ taken every
    ``lifetime`` training steps — when the :class:`~deepmetric.samplers.FixedRepresentativeSampler` redraws
    its representatives, so each lifetime solves a projection that stays close to where the previous one
    ended. ``lifetime`` defaults to ``sampler.lifetime`` (filled in by the objective). The term's weight in
    ``objective`` is λ (e.g. 2e-4, CCP-DML's value; the paper's is unknown). Unlike CCP's decoupled update
    (:mod:`deepmetric.proxies`), this is a loss term, so it passes through the optimiser (Adam rescales it).
    """

    def __init__(self, model: nn.Module, lifetime: int | None = None):
        super().__init__()
        if lifetime is None or lifetime < 1:
            raise ConfigError("proximal needs lifetime >= 1: use it with sampler.name=fixed_representatives "
                              f"(whose lifetime it takes) or set lifetime; got {lifetime}")
        self.lifetime = lifetime
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.anchor = nn.ParameterList(
            [nn.Parameter(p.detach().clone(), requires_grad=False) for n, p in model.named_parameters() if p.requires_grad])
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, step: StepInputs) -> torch.Tensor:
        params = dict(step.model.named_parameters())
        current = [params[n] for n in self.names]
        if self.training:
            if int(self.steps) % self.lifetime == 0:
                with torch.no_grad():
                    for a, p in zip(self.anchor, current):
                        a.copy_(p)
            self.steps += 1
        return 0.5 * sum(((p.float() - a.float()) ** 2).sum() for p, a in zip(current, self.anchor))

    def extra_repr(self) -> str:
        return f"lifetime={self.lifetime}"


def affine_views(x: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Every image of ``x [B, C, H, W]`` rotated by ``angle [B]`` (radians, counter-clockwise as displayed,
    row 0 at the top) and scaled by ``scale [B]`` about its centre, then shifted by ``shift [B, 2]`` pixels
    (right, down); bilinear resampling, zero fill outside. Integer shifts with no rotation or scaling move
    pixels exactly."""
    if x.dim() != 4:
        raise ConfigError(f"view_contrast needs image inputs [B, C, H, W], got shape {tuple(x.shape)}; "
                          "use it with an image or digits data set")
    _, _, h, w = x.shape
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # output pixel p samples the input at A p + t, in normalised [-1, 1] coordinates (align_corners=False)
    theta = torch.stack([torch.stack([cos, -sin * h / w, -shift[:, 0] * 2 / w], 1),
                         torch.stack([sin * w / h, cos, -shift[:, 1] * 2 / h], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_views(x: torch.Tensor, shift: float = 1.0, rotate: float = 10.0, scale: float = 0.1) -> torch.Tensor:
    """A random :func:`affine_views` of every image, drawn independently per image from torch's RNG: rotation
    by U(−rotate, rotate) degrees, scaling by U(1 − scale, 1 + scale), shift by U(−shift, shift) pixels along
    each axis. All zero gives ``x`` back."""
    u = torch.rand(x.shape[0], 4, device=x.device) * 2 - 1
    return affine_views(x, u[:, 0] * (rotate * torch.pi / 180), 1 + u[:, 1] * scale, u[:, 2:] * shift)


@register("view_contrast")
class ViewContrast(Regularizer):
    """Self-supervised view contrast: SimCLR's NT-Xent (Chen, Kornblith, Norouzi & Hinton, ICML 2020) between
    two random views (:func:`random_views`) of every image of the batch, beside the supervised loss.

    The model embeds two views of the step's inputs; over the ``2B`` embeddings each view's positive is the
    other view of the same image and its negatives are the ``2B − 2`` other views, ``ℓ = −log(e^{s⁺/τ} /
    Σ_{j≠i} e^{s_ij/τ})`` on cosine similarity, mean over the ``2B`` rows: the
    :class:`~deepmetric.losses.pair.NTXentLoss` with every image its own class. The term needs no labels,
    so it teaches invariances valid for any class, also unseen ones. τ defaults to 0.5, the value of
    SimCLR's CIFAR-10 runs. The views are embedded outside the trainer's autocast region. In a distributed
    run each rank contrasts the views of its own batch (negatives are per rank, not gathered) through the
    model without the DDP wrapper, so DDP averages the ranks' terms' gradients (not tested under DDP).
    """

    def __init__(self, temperature: float = 0.5, shift: float = 1.0, rotate: float = 10.0, scale: float = 0.1):
        super().__init__()
        if temperature <= 0 or shift < 0 or rotate < 0 or not 0 <= scale < 1:
            raise ConfigError("view_contrast: need temperature > 0, shift >= 0, rotate >= 0 and 0 <= scale < 1; "
                              f"got temperature={temperature}, shift={shift}, rotate={rotate}, scale={scale}")
        self.shift, self.rotate, self.scale = shift, rotate, scale
        self.ntxent = NTXentLoss(temperature)

    def contrast(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """NT-Xent of the paired views ``a[i] ↔ b[i]`` (``[B, D]`` each)."""
        ids = torch.arange(a.shape[0], device=a.device)
        return self.ntxent(torch.cat([a, b]), torch.cat([ids, ids]))

    def forward(self, step: StepInputs) -> torch.Tensor:
        x = step.inputs
        views = random_views(torch.cat([x, x]), self.shift, self.rotate, self.scale)
        a, b = step.model(views).chunk(2)
        return self.contrast(a, b)

    def extra_repr(self) -> str:
        return f"temperature={self.ntxent.temperature}, shift={self.shift}, rotate={self.rotate}, scale={self.scale}"


def build(name: str, **kwargs: Any) -> nn.Module:
    """Construct the regulariser registered as ``name``."""
    return REGULARIZERS.build(name, **kwargs)


def available() -> list[str]:
    """Registry keys of all regularisers."""
    return REGULARIZERS.available()
