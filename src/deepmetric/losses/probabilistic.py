"""Probabilistic proxies: images as von Mises-Fisher (vMF) distributions, classes as non-isotropic vMFs.

Kirchhof, Roth, Akata & Kasneci, "A Non-isotropic Probabilistic Take on Proxy-based Deep Metric Learning",
ECCV 2022 (arXiv 2207.03784; official code ExplainableML/Probabilistic_Deep_Metric_Learning).

* Image i is ``vMF(μ_i, κ_i)`` with ``μ_i = x̂_i`` and the **concentration = the embedding norm**
  ``κ_i = ‖x_i‖``. The loss therefore needs **unnormalised** embeddings: train with
  ``model.normalize=false`` (it raises a :class:`~deepmetric.errors.ConfigError` when a batch arrives with
  every norm equal to 1). Retrieval still uses the cosine, as the paper does.
* Class c is a non-isotropic vMF ``nivMF(μ_c, K_c)``, ``K_c = diag(κ_c)`` with per-dimension
  concentrations ``κ_c ∈ R^D`` (``self.kappa``, clamped at ``kappa_min`` = 0.1 as the official code):
  ``z ~ nivMF(μ, K)`` iff ``K z/‖K z‖ ~ vMF(Kμ/‖Kμ‖, ‖Kμ‖)``. By change of variables on the sphere
  (the Jacobian of ``z ↦ Kz/‖Kz‖`` is ``det K / ‖Kz‖^D``),

  ``log f(z) = log C_D(‖Kμ‖) + ‖Kμ‖·cos(Kz, Kμ) + Σ_d log κ_d − D·log‖Kz‖``,

  a normalised density that is exactly ``vMF(μ, k)`` for isotropic ``K = k·I``. ``variant="official"``
  reproduces the official code instead: Jacobian term ``Σ_d log κ_d − log‖Kμ‖``, ``Kz`` replaced by ``z``
  inside the expected likelihood (``utilities/misc.log_ppk_vmf_vec``) and the fitted quadratic normaliser.
* ``log C_D(κ) = (D/2 − 1) log κ − (D/2) log 2π − log I_{D/2−1}(κ)``, exact (:func:`log_bessel_iv`).

Distances (score s(i, c), divided by the temperature T; the loss is ``cross_entropy(s, y)``, the
positive included as in ProxyNCA++):

* ``el_nivmf`` (default, the paper's proposal): expected likelihood ``log E_{z~vMF_i} f_c(z)``, by Monte Carlo
  with ``mc_samples`` reparameterised samples folded as the official code does:
  ``s = LSE_s(log f_c(z_s)/T) − log S``.
* ``nivmf``: image as a point, ``log f_c(x̂_i)/T``.
* ``el_vmf`` / ``b_vmf``: probability product kernel of order ρ = 1 / ½ between vMF_i and an isotropic
  ``vMF(μ_c, κ_c)`` proxy (``self.kappa`` is ``[C, 1]``), in closed form
  ``log PPK_ρ = ρ(log C(κ_i) + log C(κ_c)) − log C(ρ‖κ_i μ_i + κ_c μ_c‖)``.
* ``kl_vmf``: ``−KL(vMF_i ‖ vMF_c) = −[log C(κ_i) − log C(κ_c) + A_D(κ_i)(κ_i − κ_c μ_iᵀμ_c)]``.

``guidance`` w > 0 adds ``w · ProxyAnchor(x̂, μ_c)`` (α = 32, δ = 0.1) on the directions, the paper's final
"EL-nivMF regularised Proxy-Anchor" (official weights 0.1-5 per data set, default 3; 0 = the probabilistic
loss alone, which trains poorly on its own on the digits demo).

**Limit.** As every κ_i → ∞ the vMF samples collapse on x̂_i, so ``el_nivmf`` → ``nivmf``; with isotropic
proxies ``κ_c = k·1`` the point score is ``log C_D(k) + k·cos(x̂_i, μ_c)``, so the loss becomes the
deterministic normalised softmax / ProxyNCA++ ``cross_entropy(k·cos/T, y)``.

Defaults from the official final runs (CUB, 128-d): T = 0.003 (learnable), concentration (initial κ_c) 6,
5 samples, guidance 3. Learning rates relative to the proxies' (``optimizer.loss_lr_mult``, official ×5000):
κ ×4 (official ×20000) and T ×0.04 (official ×200), see :meth:`NonIsotropicVMFLoss.lr_multipliers`.
The official warm start (proxies at class means, one proxy-only epoch) and the initial-norm multiplier of
the embedding layer are training-recipe choices not reproduced here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deepmetric.errors import ConfigError
from deepmetric.losses import register
from deepmetric.losses.proxy import ProxyLoss, proxy_anchor_terms

DEBYE_MIN_ORDER = 15.0  # the uniform asymptotic expansion (4 terms) is accurate to ~1e-8 above this order


def _debye_log_iv(nu: float, x: torch.Tensor) -> torch.Tensor:
    """``log I_ν(x)`` by the uniform asymptotic (Debye) expansion, Abramowitz & Stegun 9.7.7 with u_1..u_4."""
    r = torch.sqrt(nu * nu + x * x)
    t = nu / r
    t2 = t * t
    u1 = t * (3 - 5 * t2) / 24
    u2 = t2 * (81 + t2 * (-462 + t2 * 385)) / 1152
    u3 = t * t2 * (30375 + t2 * (-369603 + t2 * (765765 - t2 * 425425))) / 414720
    u4 = t2 * t2 * (4465125 + t2 * (-94121676 + t2 * (349922430 + t2 * (-446185740 + t2 * 185910725)))) / 39813120
    series = 1 + (u1 + (u2 + (u3 + u4 / nu) / nu) / nu) / nu
    return r + nu * torch.log(x / (nu + r)) - 0.5 * math.log(2 * math.pi) - 0.5 * torch.log(r) + torch.log(series)


def log_bessel_iv(nu: float, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log I_ν(x), I_{ν+1}(x)/I_ν(x))`` for an order ν ≥ 0 and x > 0, differentiable in x.

    Orders ≥ 15 use the Debye expansion directly; smaller orders start it at ``ν + m`` (≥ 15) and run the
    recurrence ``I_{j−1} = I_{j+1} + (2j/x) I_j`` downwards (stable for I), in log space.
    """
    if nu < 0:
        raise ConfigError(f"the Bessel order must be >= 0, got {nu}")
    steps = max(0, math.ceil(DEBYE_MIN_ORDER - nu))
    top = nu + steps
    log_i = _debye_log_iv(top, x)
    ratio = torch.exp(_debye_log_iv(top + 1, x) - log_i)
    for j in range(steps):  # orders top, top − 1, ..., ν + 1 (a handful of steps, vectorised over x)
        q = ratio + 2 * (top - j) / x
        log_i = log_i + torch.log(q)
        ratio = 1 / q
    return log_i, ratio


def log_vmf_normalizer(kappa: torch.Tensor, dim: int, variant: str = "exact") -> torch.Tensor:
    """``log C_D(κ)`` of the vMF density ``C_D(κ) e^{κ μᵀz}`` on ``S^{D−1}`` (w.r.t. the surface measure).

    ``variant="official"``: the official code's fitted quadratics (D = 128: ``127 − 0.01909κ − 0.003355κ²``;
    D = 512: ``868 − 0.0002662κ − 0.0009685κ²``), only defined for those two dimensions.
    """
    if variant == "official":
        if dim == 128:
            return 127 - 0.01909 * kappa - 0.003355 * kappa**2
        return 868 - 0.0002662 * kappa - 0.0009685 * kappa**2
    nu = dim / 2 - 1
    kappa = kappa.clamp(min=1e-6)
    return nu * torch.log(kappa) - dim / 2 * math.log(2 * math.pi) - log_bessel_iv(nu, kappa)[0]


def mean_resultant_length(kappa: torch.Tensor, dim: int) -> torch.Tensor:
    """``A_D(κ) = I_{D/2}(κ) / I_{D/2−1}(κ) = E[μᵀz]`` for ``z ~ vMF(μ, κ)``."""
    return log_bessel_iv(dim / 2 - 1, kappa.clamp(min=1e-6))[1]


def sample_vmf(mu: torch.Tensor, kappa: torch.Tensor, num_samples: int) -> torch.Tensor:
    """``num_samples`` reparameterised draws from ``vMF(mu[b], kappa[b])``: ``[S, B, D]``.

    Wood (1994): the component ``w = μᵀz`` by rejection, with proposals
    ``w = (1 − (1+b)ε)/(1 − (1−b)ε)``, ``ε ~ Beta((D−1)/2, (D−1)/2)`` (drawn as ``(1 + g_1/‖g‖)/2``,
    ``g ~ N(0, I_D)``), accepted if ``κw + (D−1) log(1 − x₀w) − c ≥ log u``; then
    ``z = (w, √(1−w²)·v)`` with v uniform on ``S^{D−2}``, rotated from e₁ to μ by a Householder reflection.
    Gradients reach μ (rotation) and κ (through b with the accepted ε fixed, as the official sampler; the
    rejection-correction term of Naesseth et al. 2017 is omitted). Rows of ``mu`` must be unit vectors.
    Rejection rounds loop over the not-yet-accepted draws (vectorised); each accepts with probability > ½.
    """
    n_b, dim = mu.shape
    if dim < 2:
        raise ConfigError("vMF sampling needs embedding dimension >= 2")
    m1 = dim - 1
    k = kappa.reshape(1, n_b).expand(num_samples, n_b)
    b = m1 / (2 * k + torch.sqrt(4 * k * k + m1 * m1))  # = (−2κ + √(4κ² + (D−1)²))/(D−1), without cancellation
    eps = torch.zeros_like(k, requires_grad=False)
    with torch.no_grad():
        bd = b.detach()
        x0 = (1 - bd) / (1 + bd)
        c = k.detach() * x0 + m1 * torch.log(1 - x0 * x0)
        todo = torch.ones_like(bd, dtype=torch.bool)
        while bool(todo.any()):
            g = torch.randn(*bd.shape, dim, dtype=mu.dtype, device=mu.device)
            e = 0.5 * (1 + g[..., 0] / g.norm(dim=-1))
            w = (1 - (1 + bd) * e) / (1 - (1 - bd) * e)
            u = torch.rand_like(bd)
            accept = todo & (k.detach() * w + m1 * torch.log1p(-x0 * w) - c >= torch.log(u))
            eps = torch.where(accept, e, eps)
            todo = todo & ~accept
    denom = 1 - (1 - b) * eps
    w = (1 - (1 + b) * eps) / denom
    sin = torch.sqrt((4 * b * eps * (1 - eps)).clamp(min=1e-30)) / denom  # √(1 − w²), without cancellation
    v = F.normalize(torch.randn(num_samples, n_b, m1, dtype=mu.dtype, device=mu.device), dim=-1)
    z = torch.cat([w.unsqueeze(-1), sin.unsqueeze(-1) * v], dim=-1)
    e1 = torch.zeros(dim, dtype=mu.dtype, device=mu.device)
    e1[0] = 1
    h = e1 - mu
    h = h / h.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # μ = e₁: h = 0, no reflection
    return z - 2 * (z * h).sum(-1, keepdim=True) * h


def nivmf_log_density(
    z: torch.Tensor, mu: torch.Tensor, kappa: torch.Tensor, variant: str = "exact", project: bool = True
) -> torch.Tensor:
    """``log nivMF(z_n; μ_p, diag κ_p)`` for unit points ``z [N, D]``, unit directions ``mu [P, D]`` and
    concentrations ``kappa [P, D]`` (> 0): ``[N, P]``, without any ``[N, P, D]`` tensor (two matmuls).

    ``variant="exact"``: the normalised density of the module docstring. ``"official"``: the official code's
    ``log C(‖Kμ‖) + ‖Kμ‖·cos(g(z), Kμ) + Σ log κ − log‖Kμ‖`` with its fitted normaliser, where
    ``g(z) = Kz`` (``project=True``, its point version) or ``g(z) = z`` (``project=False``, its expected
    likelihood).
    """
    dim = z.shape[1]
    k2 = kappa * kappa
    u = kappa * mu
    u_norm = u.norm(dim=1)  # ‖Kμ‖ [P]
    log_det = torch.log(kappa).sum(1)  # [P]
    log_c = log_vmf_normalizer(u_norm, dim, variant)
    if not project:  # official expected likelihood: ‖u‖·cos(z, u) = zᵀu for unit z
        return log_c + z @ u.T + log_det - torch.log(u_norm)
    kz = torch.sqrt(((z * z) @ k2.T).clamp(min=1e-30))  # ‖Kz‖ [N, P]
    dot = (z @ (k2 * mu).T) / kz  # ‖Kμ‖·cos(Kz, Kμ) = (Kz)ᵀ(Kμ)/‖Kz‖
    jacobian = -torch.log(u_norm) if variant == "official" else -dim * torch.log(kz)
    return log_c + dot + log_det + jacobian


DISTANCES = ("el_nivmf", "nivmf", "el_vmf", "b_vmf", "kl_vmf")
VARIANTS = ("exact", "official")


@register("nivmf")
class NonIsotropicVMFLoss(ProxyLoss):
    """Non-isotropic probabilistic proxies, EL-nivMF (Kirchhof, Roth, Akata & Kasneci, ECCV 2022).

    ``L = cross_entropy(s, y) + w · ProxyAnchor(x̂, μ_c)``, with ``s(i, c)`` the ``distance`` between the
    image's ``vMF(x̂_i, ‖x_i‖)`` and the class proxy (see :mod:`deepmetric.losses.probabilistic`); default
    ``el_nivmf``, ``log s = LSE_s(log nivMF_c(z_s)/T) − log S`` with ``z_s ~ vMF(x̂_i, ‖x_i‖)``.

    **Needs unnormalised embeddings** (``model.normalize=false``): the norm is the concentration.

    Parameters: ``self.proxies [C, D]`` (directions; their norm is unused, initialised
    ``xavier_normal_(gain=concentration)`` as the official code), ``self.kappa`` (``[C, D]`` per-dimension
    concentrations for the nivMF distances, ``[C, 1]`` for the vMF ones; initialised to ``concentration``,
    clamped at ``kappa_min``) and ``self.temperature`` (learnable unless ``learn_temperature=False``,
    clamped at 1e-4). ``variant="official"`` reproduces the official code's density and fitted normaliser
    (D = 128 or 512 only).
    """

    hyper_parameters = ("distance", "temperature_init", "concentration", "mc_samples", "guidance", "variant")

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        distance: str = "el_nivmf",
        temperature: float = 0.003,
        learn_temperature: bool = True,
        concentration: float = 6.0,
        mc_samples: int = 5,
        guidance: float = 3.0,
        kappa_min: float = 0.1,
        variant: str = "exact",
        kappa_lr_mult: float = 4.0,
        temperature_lr_mult: float = 0.04,
    ):
        super().__init__(num_classes, embedding_size)
        if distance not in DISTANCES:
            raise ConfigError(f"distance must be one of {DISTANCES}, got {distance!r}")
        if variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if variant == "official" and embedding_size not in (128, 512):
            raise ConfigError(
                f"variant='official' uses the official code's normaliser fitted for D = 128 or 512, got "
                f"embedding_size={embedding_size}; use variant='exact'"
            )
        for name, value in (("temperature", temperature), ("concentration", concentration), ("kappa_min", kappa_min)):
            if not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value}")
        # (not `num_samples`: the trainer fills a constructor's `num_samples` with the data-set size)
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ConfigError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        if guidance < 0 or kappa_lr_mult < 0 or temperature_lr_mult < 0:
            raise ConfigError("guidance and the learning-rate multipliers must be >= 0")
        self.distance, self.variant = distance, variant
        self.temperature_init, self.concentration = float(temperature), float(concentration)
        self.mc_samples, self.guidance, self.kappa_min = mc_samples, float(guidance), float(kappa_min)
        self.kappa_lr_mult, self.temperature_lr_mult = float(kappa_lr_mult), float(temperature_lr_mult)
        proxies = torch.empty(num_classes, embedding_size)
        nn.init.xavier_normal_(proxies, gain=concentration)
        self.proxies = nn.Parameter(proxies)
        width = embedding_size if distance in ("el_nivmf", "nivmf") else 1
        self.kappa = nn.Parameter(torch.full((num_classes, width), float(concentration)))
        self.temperature = nn.Parameter(torch.tensor(float(temperature)), requires_grad=learn_temperature)

    def lr_multipliers(self) -> dict[str, float]:
        """Learning rates of ``kappa`` and ``temperature`` relative to the proxies' (the optimiser's loss group)."""
        return {"kappa": self.kappa_lr_mult, "temperature": self.temperature_lr_mult}

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """``s(i, c)`` (already divided by the temperature), ``[B, C]``."""
        dtype = x.dtype
        norm = x.norm(dim=1).clamp(min=1e-12)
        mu_i = x / norm[:, None]
        mu_c = F.normalize(self.proxies.to(dtype), dim=1)
        kappa_c = self.kappa.to(dtype).clamp(min=self.kappa_min)
        t = self.temperature.to(dtype).clamp(min=1e-4)
        dim = x.shape[1]
        if self.distance == "nivmf":
            return nivmf_log_density(mu_i, mu_c, kappa_c, self.variant) / t
        if self.distance == "el_nivmf":
            z = sample_vmf(mu_i, norm, self.mc_samples)  # [S, B, D]
            log_f = nivmf_log_density(z.reshape(-1, dim), mu_c, kappa_c, self.variant,
                                      project=self.variant == "exact")
            log_f = log_f.view(self.mc_samples, x.shape[0], -1) / t
            return torch.logsumexp(log_f, dim=0) - math.log(self.mc_samples)
        k_c = kappa_c.squeeze(1)
        cos = mu_i @ mu_c.T
        log_c_i = log_vmf_normalizer(norm, dim, self.variant)[:, None]
        log_c_c = log_vmf_normalizer(k_c, dim, self.variant)[None, :]
        if self.distance == "kl_vmf":
            a_i = mean_resultant_length(norm, dim)[:, None]
            return -(log_c_i - log_c_c + a_i * (norm[:, None] - k_c[None, :] * cos)) / t
        rho = 1.0 if self.distance == "el_vmf" else 0.5
        joint = torch.sqrt((norm[:, None] ** 2 + k_c[None, :] ** 2 + 2 * norm[:, None] * k_c[None, :] * cos).clamp(min=1e-30))
        return (rho * (log_c_i + log_c_c) - log_vmf_normalizer(rho * joint, dim, self.variant)) / t

    def compute(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        norm = x.norm(dim=1)
        if self.training and x.shape[0] > 1 and bool(((norm - 1).abs() < 1e-4).all()):
            raise ConfigError(
                "nivmf reads each image's concentration from its embedding norm, but every embedding has "
                "norm 1: train with unnormalised embeddings (model.normalize=false)"
            )
        loss = F.cross_entropy(self.scores(x), labels)
        if self.guidance > 0:
            loss = loss + self.guidance * proxy_anchor_terms(self.cosine(x), labels, 32.0, 0.1)
        return loss
