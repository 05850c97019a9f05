"""Configuration of the transfer (``deepmetric transfer``) and ooDML (``deepmetric ood``) protocols.

Pydantic, unknown keys forbidden, the same YAML + ``--set a.b=value`` handling as a training run
(:mod:`deepmetric.training.config`). Each source model is an ordinary training run: ``source`` is a full
:class:`~deepmetric.training.config.RunConfig`, and the classifier and prototypical-network sources are
that run with a few overrides (``set`` lists, same syntax as ``--set``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from deepmetric.training.config import (
    EvalConfig,
    LossConfig,
    MinerConfig,
    ModelConfig,
    RunConfig,
    Section,
    apply_overrides,
    validate,
)

Method = Literal["baseline", "weight_transfer", "dml", "protonet", "adapted_dml", "adapted_protonet"]
METHODS: tuple[str, ...] = ("baseline", "weight_transfer", "dml", "protonet", "adapted_dml", "adapted_protonet")


def default_source() -> RunConfig:
    """The protocols' source run: the built-in digits run (source classes 0-4, target 5-9) with a half-width
    ``small_cnn`` (the k-shot fits run thousands of steps on a CPU) and no t-SNE map in its report."""
    return RunConfig(model=ModelConfig(backbone_kwargs={"width": 16}), eval=EvalConfig(tsne=False))


def _merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` written over it, nested sections merged key by key."""
    out = dict(base)
    for key, value in update.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def derive(source: RunConfig, overrides: list[str]) -> RunConfig:
    """``source`` with ``--set``-style overrides applied (validated like a run configuration)."""
    return validate(apply_overrides(source.model_dump(mode="json"), list(overrides)))


class _WithSource(Section):
    """A protocol config holding a ``source`` run: keys given for it are written over :func:`default_source`."""

    @model_validator(mode="before")
    @classmethod
    def _source_defaults(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and isinstance(raw.get("source"), dict):
            raw = {**raw, "source": _merged(default_source().model_dump(mode="json"), raw["source"])}
        return raw


class TargetFit(Section):
    """Training on the k-shot target data, with the stopping rule of Scott et al. (2018).

    Every ``patience`` epochs, training stops when the best training accuracy so far has gained less than
    ``min_gain`` (relative) over its value at the previous check; the returned weights are those of the
    epoch with the best training accuracy (there is no target validation set). ``max_epochs=0`` returns the
    source weights unchanged.
    """

    lr: float = Field(5e-4, gt=0, description="Adam learning rate on the target data")
    max_epochs: int = Field(500, ge=0, description="passes over the support set at most (Scott et al.: 500)")
    patience: int = Field(10, ge=1, description="epochs between two stopping checks (Scott et al.: 20; 10 keeps "
                          "the digits sweep within minutes on a CPU)")
    min_gain: float = Field(0.01, ge=0, description="smallest relative gain of the best training accuracy "
                            "per patience window to go on (Scott et al.: 1%)")
    batch_size: int = Field(2048, ge=1, description="support items per step (Scott et al.: 1,024-2,048, i.e. all)")
    params: Literal["all", "head"] = Field("all", description="train every weight, or only the embedding head's "
                                           "last linear layer (the ooDML adaptation)")


class WeightTransferConfig(TargetFit):
    head_init: Literal["xavier", "normal", "default"] = Field(
        "xavier", description="initialisation of the new n-way output layer: xavier (Glorot uniform), normal "
        "(N(0, 1), as Scott et al.'s reported runs), default (PyTorch's); the bias starts at 0")


class AdaptedProtonetConfig(TargetFit):
    support_fraction: float = Field(0.75, gt=0, lt=1, description="share of each class's k items used as support "
                                    "in an adaptation episode, the rest as queries (Scott et al.: 0.75)")


class ProtonetConfig(Section):
    """Episodic training of the prototypical network on the source classes (Snell et al. 2017)."""

    shots: int | None = Field(5, ge=1, description="support items per class in a training episode (Snell et al. "
                              "train one network at a fixed shot); null = the target k, one source network per k "
                              "(Scott et al.; 4x the training time of the default sweep)")
    queries: int = Field(15, ge=1, description="query items per class in a training episode")
    classes_per_episode: int = Field(5, ge=2, description="classes per training episode (Scott et al.: 5)")
    set: list[str] = Field(
        default_factory=lambda: ["model.normalize=false", "train.epochs=10", "train.iterations_per_epoch=20"],
        description="overrides of the source run (prototypes live in unnormalised Euclidean space)")


class TransferConfig(_WithSource):
    """``deepmetric transfer``: k-shot transfer from the source classes to the target classes
    (Scott, Ridgeway & Mozer, NeurIPS 2018)."""

    seed: int = 0
    source: RunConfig = Field(default_factory=default_source, description="the DML source run; its train split "
                              "holds the source classes and its test split the target classes")
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10, 50], description="shots per target class")
    ns: list[int] = Field(default_factory=lambda: [5], description="ways: target classes per episode")
    episodes: int = Field(10, ge=1, description="replications per (n, k): re-sampled classes and items")
    query: int | None = Field(None, ge=1, description="query items per class; null = all the other items of the class")
    methods: list[Method] = Field(
        default_factory=lambda: [m for m in METHODS if m != "baseline"],
        description="add `baseline` for the n-way classifier trained from scratch (unstable under the stopping "
        "rule: a from-scratch network that stalls for `patience` epochs is stopped)")
    dml_classifier: Literal["knn", "prototype"] = Field(
        "knn", description="how DML embeddings classify queries (Scott et al.: 1-NN, cosine)")
    classifier_set: list[str] = Field(
        default_factory=lambda: ["objective=[]", "loss={name: cross_entropy}", "miner.name=null", "memory.size=0",
                                 "model.normalize=false"],
        description="overrides turning the source run into the classifier of weight transfer")
    protonet: ProtonetConfig = Field(default_factory=ProtonetConfig)
    weight_transfer: WeightTransferConfig = Field(default_factory=WeightTransferConfig)
    adapted_dml: TargetFit = Field(default_factory=TargetFit)
    adapted_protonet: AdaptedProtonetConfig = Field(default_factory=AdaptedProtonetConfig)

    @field_validator("ks", "ns")
    @classmethod
    def _positive(cls, values: list[int], info) -> list[int]:
        low = 1 if info.field_name == "ks" else 2
        if not values or any(v < low for v in values):
            flag = "--k" if info.field_name == "ks" else "--n"
            raise ValueError(f"{info.field_name} (the command's {flag}) must be a non-empty list of integers >= {low}")
        return sorted(set(values))

    @field_validator("methods")
    @classmethod
    def _some(cls, values: list[str]) -> list[str]:
        if not values:
            raise ValueError(f"methods must name at least one of {', '.join(METHODS)}")
        return [m for m in METHODS if m in values]


class GenerateConfig(Section):
    """ooDML split generation by iterative class swapping (Milbich et al. 2021)."""

    n_iter: int = Field(25, ge=1, description="recorded iterations of the harder-split sequence (paper: 25)")
    swaps_per_iter: int = Field(2, ge=1, description="class swaps per iteration (paper: 2 for CUB/Cars)")
    history: int = Field(5, ge=0, description="a slot swapped within the last `history` swaps is skipped (paper: 5)")
    easier_iter: int = Field(0, ge=0, description="iterations of the reversed ranking (easier splits; paper: CUB, "
                             "with history 30)")
    easier_history: int = Field(30, ge=0)
    removal_iter: int = Field(0, ge=0, description="iterations that continue from the hardest split and delete the "
                              "swapped classes when a swap does not raise the FID (the paper's 'R' splits)")
    keep: int = Field(8, ge=2, description="splits kept, spread evenly over the FID range (paper: 8-9)")
    val_fraction: float = Field(0.25, gt=0, lt=1, description="share of each split's train classes in split_val")


class OODFewShotConfig(Section):
    """Few-shot adaptation on each split's test classes (Milbich et al. 2021, fewshot_ood_main.py)."""

    shots: list[int] = Field(default_factory=lambda: [2, 5], description="support items per test class")
    metric: str = Field("recall@1", description="scored on the query set before and after adaptation (paper: "
                        "Recall@1; map@r where Recall@1 saturates, as on digits)")
    episodes: int = Field(10, ge=1)
    epochs: int = Field(100, ge=0, description="passes over the support set (paper: 1,000 for 2-shot, "
                        "1,500 for 5-shot)")
    lr_mult: float = Field(10.0, gt=0, description="Adam lr = lr_mult x the source run's optimizer.lr (paper: 10)")
    params: Literal["head", "all"] = Field("head", description="paper: only the last linear (embedding) layer")
    batch_size: int = Field(112, ge=2)
    loss: LossConfig = Field(default_factory=lambda: LossConfig(name="margin"))
    miner: MinerConfig = Field(default_factory=lambda: MinerConfig(name="distance_weighted"))

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        return _known_metric(value)


def _known_metric(name: str) -> str:
    from deepmetric.evaluation.api import parse_metrics

    parse_metrics([name], (1,))  # raises ConfigError (a ValueError) naming the valid metrics
    return name


class OODConfig(_WithSource):
    """``deepmetric ood``: train and evaluate across ooDML splits of increasing train-test shift."""

    seed: int = 0
    source: RunConfig = Field(default_factory=default_source, description="the run trained on every split; its "
                              "train/test splits give the initial class split, its data set the classes")
    splits: str | None = Field(None, description="a published (.pkl) or generated (.json) split file; null = generate")
    extractor: str | None = Field(None, description="run folder whose model gives the features for the class "
                                  "statistics; null = the raw inputs (flattened)")
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    fewshot: OODFewShotConfig = Field(default_factory=OODFewShotConfig)
    metrics: list[str] = Field(default_factory=lambda: ["recall@1", "map@r"])

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, values: list[str]) -> list[str]:
        if not values:
            raise ValueError("metrics must name at least one metric, e.g. [recall@1, map@r]")
        return [_known_metric(v) for v in values]
