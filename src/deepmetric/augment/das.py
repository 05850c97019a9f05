"""DAS: densely anchored sampling (Liu, Huang, Zhuang, Yang, Tan & Wang, ECCV 2022; ``lizhaoliu-Lec/DAS``)."""

from __future__ import annotations

import torch

from deepmetric.augment import Augmented, Augmenter, check_class_batch, maybe_normalize, register
from deepmetric.distances import as_compute_dtype
from deepmetric.errors import ConfigError


@register("das")
class DenselyAnchoredSampling(Augmenter):
    """DAS: every embedding ``z`` (what the loss sees) spawns ``n_p`` extra embeddings of its class, appended
    with the same labels; they take part in the loss and its miner like real ones, **anchors included**.

    State: a count matrix ``F ∈ N^{C×D}`` and, per class, a FIFO bank ``Q_c`` of at most ``N_q`` (detached)
    within-class difference vectors (one ``[C, N_q, D]`` tensor with write pointers). Per step:

    1. ``F[y_i, top-K_s(z_i)] += 1`` (indices of the K_s largest *signed* entries of each z_i);
    2. every non-zero ``z_i − z_j`` of two samples of the same class in the batch (ordered pairs, batch
       order) is enqueued in ``Q_{y_i}``, keeping the newest ``N_q``;
    3. for each copy t and sample i, with ``idx`` = the K_s largest entries of the row ``F[y_i]``:
       ``z̃ = z_i`` (detached with ``detach``); ``z̃[idx] *= U(a, b)`` (discriminative feature scaling, DFS);
       ``z̃ += β·q``, q uniform from ``Q_{y_i}`` (0 while empty; memorised transformation shifting, MTS);
       L2-normalise ``z̃`` when ``normalize`` (the head's setting; off for unnormalised losses).

    Steps 1 and 2 run first, so the current batch counts. Defaults are the official code's: n_p = 3,
    K_s = 4, (a, b) = (0.5, 2), N_q = 10, β = 0.01, no detach; its scripts use K_s = 8 for Table 1 (MS),
    (a, b) = (0.99, 1.01) with ``detach`` on CUB/Cars and β = 0.1 on SOP. ``num_produce=0`` is the identity.

    ``aux_loss`` (the code's option, some SOP runs): each loss of the objective is evaluated on the real rows
    alone (mined on their own) plus ``aux_weight`` × on the real and produced rows,
    ``L = ℓ(real) + aux_weight·ℓ(real ∪ produced)`` (the code's ``aux_loss_weight``, default 1); the first
    part is logged as the term ``<loss>/real``.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        num_produce: int = 3,
        num_scale: int = 4,
        scale_range: tuple[float, float] = (0.5, 2.0),
        bank_size: int = 10,
        shift: float = 0.01,
        normalize: bool = True,
        detach: bool = False,
        aux_loss: bool = False,
        aux_weight: float = 1.0,
    ):
        super().__init__()
        if num_produce < 0 or bank_size < 1 or not 1 <= num_scale <= embedding_size:
            raise ConfigError(f"das: need num_produce >= 0, bank_size >= 1 and 1 <= num_scale <= embedding_size "
                              f"({embedding_size}); got {num_produce}, {bank_size}, {num_scale}")
        if aux_weight < 0:
            raise ConfigError(f"das: aux_weight must be >= 0, got {aux_weight}")
        low, high = (float(v) for v in scale_range)
        if not 0 <= low <= high:
            raise ConfigError(f"das: scale_range must be [a, b] with 0 <= a <= b, got {list(scale_range)}")
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.num_produce, self.num_scale, self.scale_range = num_produce, num_scale, (low, high)
        self.bank_size, self.shift, self.normalize, self.detach = bank_size, float(shift), normalize, detach
        self.aux_loss, self.aux_weight = aux_loss, float(aux_weight)
        self.register_buffer("frequency", torch.zeros(num_classes, embedding_size, dtype=torch.long))
        self.register_buffer("bank", torch.zeros(num_classes, bank_size, embedding_size))
        self.register_buffer("bank_count", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("bank_ptr", torch.zeros(num_classes, dtype=torch.long))

    @torch.no_grad()
    def _count(self, z: torch.Tensor, labels: torch.Tensor) -> None:
        top = z.topk(self.num_scale, dim=1).indices
        rows = labels[:, None].expand_as(top)
        self.frequency.index_put_((rows, top), torch.ones_like(top), accumulate=True)

    @torch.no_grad()
    def _enqueue(self, z: torch.Tensor, labels: torch.Tensor) -> None:
        same = labels[:, None] == labels[None, :]
        same.fill_diagonal_(False)
        i, j = same.nonzero(as_tuple=True)  # row-major: batch order
        diff = z[i] - z[j]
        nonzero = diff.abs().sum(1) > 0  # drops duplicated samples (zero differences), as the code does
        cls, diff = labels[i[nonzero]], diff[nonzero]
        order = torch.argsort(cls, stable=True)
        cls, diff = cls[order], diff[order]
        counts = torch.bincount(cls, minlength=self.num_classes)
        rank = torch.arange(cls.numel(), device=cls.device) - (torch.cumsum(counts, 0) - counts)[cls]
        newest = rank >= counts[cls] - self.bank_size
        slot = (self.bank_ptr[cls] + rank) % self.bank_size
        self.bank[cls[newest], slot[newest]] = diff[newest].to(self.bank.dtype)
        self.bank_ptr.copy_((self.bank_ptr + counts) % self.bank_size)
        self.bank_count.copy_((self.bank_count + counts).clamp(max=self.bank_size))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, raw: torch.Tensor | None = None) -> Augmented:
        if self.num_produce == 0:
            return self.identity(embeddings, labels)
        check_class_batch(embeddings, labels, self.num_classes, self.embedding_size, "das")
        z = as_compute_dtype(embeddings)
        self._count(z.detach(), labels)
        self._enqueue(z.detach(), labels)
        n, (b, d) = self.num_produce, z.shape
        idx = self.frequency[labels].topk(self.num_scale, dim=1).indices.expand(n, b, self.num_scale)
        base = (z.detach() if self.detach else z).expand(n, b, d)
        low, high = self.scale_range
        scale = torch.rand(n, b, self.num_scale, device=z.device, dtype=z.dtype) * (high - low) + low
        x = base.scatter(2, idx, base.gather(2, idx) * scale)
        count = self.bank_count[labels]
        slot = (torch.rand(n, b, device=z.device) * count).long().clamp(max=self.bank_size - 1)
        shift = self.bank[labels.expand(n, b), slot] * (count > 0).to(self.bank.dtype)[:, None]
        x = maybe_normalize(x + self.shift * shift.to(z.dtype), self.normalize)
        return self.append(embeddings, labels, x.reshape(n * b, d), labels.repeat(n))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_produce={self.num_produce}, num_scale={self.num_scale}, "
                f"scale_range={self.scale_range}, bank_size={self.bank_size}, shift={self.shift}, "
                f"normalize={self.normalize}, detach={self.detach}, aux_loss={self.aux_loss}, "
                f"aux_weight={self.aux_weight}")
