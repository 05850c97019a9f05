"""Synthetic points and classes: Embedding Expansion, Proxy Synthesis and generated novel classes.

All three make new embeddings as convex combinations (:func:`mix`); Proxy Synthesis and the novel-class
generator also make new **classes** (:class:`~deepmetric.augment.ClassMix`), whose proxies a proxy loss of
the objective gets by mixing the proxies of the two source classes
(:func:`~deepmetric.augment.proxy_loss_with_classes`).
"""

from __future__ import annotations

import torch
from torch import nn

from deepmetric.augment import Augmented, Augmenter, ClassMix, check_class_batch, maybe_normalize, register
from deepmetric.distances import as_compute_dtype
from deepmetric.errors import ConfigError
from deepmetric.pairing import PairRule
from deepmetric.validation import check_pair


def mix(x: torch.Tensor, first: torch.Tensor, second: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
    """``weight · x[first] + (1 − weight) · x[second]`` (``weight`` a scalar or one value per row)."""
    w = weight[:, None] if isinstance(weight, torch.Tensor) and weight.ndim else weight
    return w * x[first] + (1 - w) * x[second]


def beta_sample(alpha: float, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Draws of Beta(α, α) from the torch RNG (seeded and checkpointed by the trainer)."""
    a = torch.tensor(float(alpha), device=device)
    return torch.distributions.Beta(a, a).sample(shape)


@register("embedding_expansion")
class EmbeddingExpansion(Augmenter):
    """Embedding Expansion (Ko & Gu, CVPR 2020; ``clovaai/embedding-expansion``): ``n`` points at fractions
    ``k/(n + 1)`` (k = 1..n) along every pair of same-class embeddings of the batch, L2-normalised when the
    head normalises, with the pair's label.

    The paper pairs them with its HPHN triplet loss: **anchors and positives are real**, the hardest
    negative is searched among real *and* synthetic points — here a :class:`~deepmetric.pairing.PairRule`
    (synthetic rows are negatives only), so ``loss.name=triplet, miner.name=batch_hard`` is HPHN and every
    other pair loss gets the same roles. Differences from the code: every same-class pair of the batch is
    expanded (the code's m = 2 batches have one pair per class, expanded from both ends, so each point twice),
    and the code's hardest negative also takes the minimum over the synthetic points between an anchor and
    its pair partner; with a miner, a triplet whose mined positive is synthetic is dropped rather than
    re-mined (:func:`deepmetric.pairing.pair_indices`). n = 2 (``num_points``); 0 is the identity.
    """

    def __init__(self, num_points: int = 2, normalize: bool = True):
        super().__init__()
        if num_points < 0:
            raise ConfigError(f"embedding_expansion: num_points must be >= 0, got {num_points}")
        self.num_points, self.normalize = num_points, normalize

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, raw: torch.Tensor | None = None) -> Augmented:
        if self.num_points == 0:
            return self.identity(embeddings, labels)
        check_pair(embeddings, labels)
        z = as_compute_dtype(embeddings)
        b = z.shape[0]
        i, j = torch.triu(labels[:, None] == labels[None, :], diagonal=1).nonzero(as_tuple=True)
        t = torch.arange(1, self.num_points + 1, device=z.device, dtype=z.dtype) / (self.num_points + 1)
        starts, ends = i.repeat(self.num_points), j.repeat(self.num_points)
        x = maybe_normalize(mix(z, ends, starts, t.repeat_interleave(i.numel())), self.normalize)
        out = self.append(embeddings, labels, x, labels[starts])
        rule = PairRule(anchors=torch.arange(b, device=z.device), positives=~out.is_synthetic)
        return out._replace(pairs=rule)

    def extra_repr(self) -> str:
        return f"num_points={self.num_points}, normalize={self.normalize}"


def interleaved(labels: torch.Tensor) -> torch.Tensor:
    """An order of the rows in which consecutive rows (cyclically) have different labels when every class
    has as many rows: the first sample of each class (batch order), then the second ... (batch order itself
    when all labels differ)."""
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    start = torch.searchsorted(sorted_labels, sorted_labels)
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(labels.numel(), device=labels.device) - start
    return torch.argsort(rank, stable=True)


@register("proxy_synthesis")
class ProxySynthesis(Augmenter):
    """Proxy Synthesis (Gu, Ko & Kim, AAAI 2021; ``navervision/proxy-synthesis``), for proxy losses.

    With λ ~ Beta(α, α) once per batch, synthetic point and class s mix two consecutive rows i, i' of the batch:
    ``x̃_s = λ x_i + (1 − λ) x_{i'}`` (L2-normalised) with the new label ``C + s``, whose proxy is
    ``λ p̂_{y_i} + (1 − λ) p̂_{y_{i'}}`` (:func:`~deepmetric.augment.proxy_loss_with_classes`); the first
    ``⌊B·μ⌋`` are kept, so the loss sees ``B(1 + μ)`` embeddings and ``C + ⌊Bμ⌋`` proxies. The code's
    batches hold one image per class and pair row i with row i − 1 (``roll``); with m per class the rows are
    first put in :func:`interleaved` order, so that the two rows of a pair have different classes.
    Defaults α = 0.4, μ = 1 (the paper's); ``mu=0`` is the identity. Every row is an anchor; a pair-based
    loss sees the synthetic rows as singleton classes (negatives only).
    """

    def __init__(self, num_classes: int, alpha: float = 0.4, mu: float = 1.0, normalize: bool = True):
        super().__init__()
        if alpha <= 0 or not 0 <= mu <= 1:
            raise ConfigError(f"proxy_synthesis: need alpha > 0 and 0 <= mu <= 1, got alpha={alpha}, mu={mu}")
        self.num_classes, self.alpha, self.mu, self.normalize = num_classes, float(alpha), float(mu), normalize

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, raw: torch.Tensor | None = None) -> Augmented:
        b = labels.shape[0]
        s = int(b * self.mu)
        if s == 0:
            return self.identity(embeddings, labels)
        check_class_batch(embeddings, labels, self.num_classes, embeddings.shape[1], "proxy_synthesis")
        z = as_compute_dtype(embeddings)
        order = interleaved(labels)
        first, second = order[:s], order.roll(1)[:s]
        lam = beta_sample(self.alpha, (), z.device).to(z.dtype)
        x = maybe_normalize(mix(z, first, second, lam), self.normalize)
        new = self.num_classes + torch.arange(s, device=labels.device)
        classes = ClassMix(labels[first], labels[second], lam.expand(s))
        return self.append(embeddings, labels, x, new, classes=classes)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, alpha={self.alpha}, mu={self.mu}, normalize={self.normalize}"


@register("novel_classes")
class NovelClassGenerator(Augmenter):
    """Generated novel classes (Lee, Kim, Hong & Kwak, BMVC 2021, arXiv 2201.01008), **reconstructed**: only
    the abstract was available ("a conditional generative model, which, given a class label and a noise,
    produces a random embedding vector of the class"; "novel classes" for proxy-based losses).

    Design [recon]: a generator ``G(c, ε) = MLP([code(c); ε])``, ε ~ N(0, I_{noise_dim}), L2-normalised when
    the head normalises, where ``code`` is a learned embedding of the C class labels; a **novel class**
    mixes two different classes a, b of the batch with ν ~ Beta(α, α): ``code = ν code(a) + (1 − ν) code(b)``,
    label ``C + s``, and its proxy is ``ν p̂_a + (1 − ν) p̂_b`` (:class:`~deepmetric.augment.ClassMix`). Each step
    adds ``per_class`` generated embeddings of every class of the batch (with its label) and of
    ``num_novel`` novel classes (default: as many as the batch has classes). G is trained alongside the
    loss, by the same objective: the proxy loss classifies ``G(c, ·)`` as c and ``G(novel, ·)`` as the mixed
    proxy, while the real proxies learn from the extra classes (the generated rows carry no gradient to the
    network). G's parameters get their own optimiser group, learning rate ``optimizer.lr × lr_mult``.
    ``per_class=0`` is the identity.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        num_novel: int | None = None,
        per_class: int = 2,
        noise_dim: int = 32,
        hidden: int = 256,
        alpha: float = 1.0,
        lr_mult: float = 1.0,
        normalize: bool = True,
    ):
        super().__init__()
        if per_class < 0 or noise_dim < 1 or hidden < 1 or alpha <= 0 or lr_mult < 0 or (num_novel or 0) < 0:
            raise ConfigError("novel_classes: need per_class >= 0, noise_dim >= 1, hidden >= 1, alpha > 0, "
                              f"lr_mult >= 0 and num_novel >= 0; got {per_class}, {noise_dim}, {hidden}, {alpha}, "
                              f"{lr_mult}, {num_novel}")
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.num_novel, self.per_class, self.noise_dim, self.alpha = num_novel, per_class, noise_dim, float(alpha)
        self.lr_mult, self.normalize = float(lr_mult), normalize
        self.codes = nn.Embedding(num_classes, hidden)
        self.generator = nn.Sequential(nn.Linear(hidden + noise_dim, hidden), nn.ReLU(), nn.Linear(hidden, embedding_size))

    def generate(self, codes: torch.Tensor) -> torch.Tensor:
        """``per_class`` embeddings for each row of ``codes [K, hidden]``: ``[per_class · K, D]`` (copy-major)."""
        codes = codes.repeat(self.per_class, 1)
        noise = torch.randn(codes.shape[0], self.noise_dim, device=codes.device, dtype=codes.dtype)
        return maybe_normalize(self.generator(torch.cat([codes, noise], dim=1)), self.normalize)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, raw: torch.Tensor | None = None) -> Augmented:
        if self.per_class == 0:
            return self.identity(embeddings, labels)
        check_class_batch(embeddings, labels, self.num_classes, self.embedding_size, "novel_classes")
        present = torch.unique(labels)
        p = present.numel()
        s = (p if self.num_novel is None else self.num_novel) if p > 1 else 0  # a novel class needs two classes
        a = b = present[:0]
        if s:
            pick = torch.randint(p, (s,), device=labels.device)
            a, b = present[pick], present[(pick + torch.randint(1, p, (s,), device=labels.device)) % p]
        nu = beta_sample(self.alpha, (s,), labels.device)
        codes = self.codes.weight
        x = self.generate(torch.cat([codes[present], mix(codes, a, b, nu.to(codes.dtype))]))
        new = torch.cat([present, self.num_classes + torch.arange(s, device=labels.device)])
        return self.append(embeddings, labels, x, new.repeat(self.per_class), classes=ClassMix(a, b, nu))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_novel={self.num_novel}, per_class={self.per_class}, "
                f"noise_dim={self.noise_dim}, alpha={self.alpha}, lr_mult={self.lr_mult}")
