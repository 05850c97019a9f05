"""Run configuration: YAML validated by a pydantic schema, with ``--set a.b=value`` overrides.

Every section forbids unknown keys, so a typo is an error naming the key and the valid choices.
Components named by registry key (``loss.name``, ``miner.name``, ``data.name``, ``model.backbone``) take
their hyper-parameters as extra keys of the same section; those are checked against the component's
constructor when the run is built (:func:`check_components`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from deepmetric.errors import ConfigError, suggest


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Component(BaseModel):
    """A section naming a registered component; extra keys are its constructor keywords."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: str

    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DataConfig(Section):
    name: str = "digits"
    root: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    query_split: str | None = Field(None, description="separate query/gallery evaluation (In-Shop)")
    gallery_split: str | None = None
    val_classes: int | float = Field(
        0, description="training classes held out (class-disjoint) to select the checkpoint; 0 = none"
    )
    val_folds: int = Field(
        0, ge=0, description="cut the sorted training classes into this many class-disjoint folds and hold out "
        "fold `val_fold` to select the checkpoint (the Reality Check's cross-validation uses 4); 0 = none"
    )
    val_fold: int = Field(0, ge=0, validate_default=True,
                          description="the fold held out when val_folds > 0 (numbered from 0)")
    num_workers: int = Field(0, ge=0)
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keywords for the data set")

    @field_validator("val_fold")
    @classmethod
    def _fold_exists(cls, fold: int, info: ValidationInfo) -> int:
        folds = info.data.get("val_folds", 0)
        if folds == 1:
            raise ValueError("data.val_folds must be 0 (no folds) or at least 2")
        if folds and fold >= folds:
            raise ValueError(f"data.val_fold must be below data.val_folds ({folds}); folds are numbered from 0")
        if folds and info.data.get("val_classes"):
            raise ValueError("set either data.val_classes (randomly held-out classes) or data.val_folds, not both")
        return fold


class SamplerConfig(Component):
    """Batch sampler (``deepmetric.samplers``): ``m_per_class``, ``fixed_representatives`` or ``npair`` (extra
    keys are its keywords, e.g. ``lifetime``, ``mining``)."""

    name: str = "m_per_class"
    batch_size: int = Field(64, ge=2)
    m: int = Field(16, ge=1, description="samples per class in a batch (npair: always 2)")

    @model_validator(mode="before")
    @classmethod
    def _npair_pairs(cls, data: Any) -> Any:
        """``npair`` batches are N classes x 2 images: m is 2 and batch_size must be even."""
        if not isinstance(data, dict) or data.get("name") != "npair":
            return data
        if data.get("m", 2) != 2:
            raise ValueError(f"sampler 'npair' takes exactly 2 images per class; remove sampler.m (got {data['m']})")
        if isinstance(data.get("batch_size"), int) and data["batch_size"] % 2:
            raise ValueError(f"sampler 'npair' builds batches of N classes x 2 images: batch_size must be even, "
                             f"got {data['batch_size']}")
        return {**data, "m": 2}


class ModelConfig(Section):
    backbone: str = "small_cnn"
    pretrained: bool = False
    pretrained_path: str | None = None
    backbone_kwargs: dict[str, Any] = Field(default_factory=dict)
    head: str = Field("linear", description="embedding head (deepmetric.models.HEADS): linear, or multi_head "
                      "(global + part heads with non-local attention; needs an unpooled backbone map)")
    head_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keywords for the head")
    embedding_size: int = Field(64, ge=1, description="the model's output size (with members: all members together)")
    members: int = Field(1, ge=1, description="a deep ensemble of this many networks, each with its own copy of the "
                         "loss, embedding_size / members dimensions each; the embedding is their concatenation / √k")
    batch_norm: bool = False
    normalize: bool = True
    freeze_bn: bool = False


class LossConfig(Component):
    name: str = "multi_similarity"


class TermConfig(Component):
    """One term of a composed objective: a registered loss or regulariser, its weight and its keywords."""

    weight: float = Field(1.0, ge=0, description="multiplier of this term in the total loss")


class AugmentConfig(Component):
    """Embedding-space augmentation between the head and the miner/loss; ``name: null`` = none."""

    name: str | None = None  # type: ignore[assignment]


class MinerConfig(Component):
    name: str | None = None  # type: ignore[assignment]


class MemoryConfig(Section):
    """Cross-batch memory (XBM; Wang et al. 2020): past embeddings as extra references for the loss."""

    size: int = Field(0, ge=0, description="queue length in samples; 0 = no memory")
    weight: float = Field(1.0, ge=0, description="weight of the loss against the memory")
    start_epoch: int = Field(1, ge=1, description="first epoch that uses (and fills) the memory")


class ProxiesConfig(Section):
    """Proxy re-placement for proxy losses: CCP-DML (Gürbüz et al. 2022), see :mod:`deepmetric.proxies`."""

    ccp: bool = Field(False, description="re-place the proxies by k-center picks among embedded training samples")
    every: int | None = Field(
        None, ge=1, description="re-place every N epochs; null = the paper's rule: when train.select_metric on the "
        "validation split has not improved by min_delta for patience evaluations"
    )
    patience: int = Field(3, ge=1, description="evaluations without improvement before a re-placement")
    min_delta: float = Field(1e-5, ge=0, description="smallest improvement that counts")
    pool: int = Field(12, ge=1, description="b: random training images per class embedded to pick from "
                      "(paper: 12 CUB/Cars, 7 SOP/In-Shop)")
    proximal: float = Field(2e-4, ge=0, description="lambda of the pull towards the best weights after the first "
                            "plateau re-placement; 0 = off")
    reset_state: bool = Field(False, description="reset the optimiser state of re-placed proxies (the reference keeps it)")


class OptimizerConfig(Section):
    name: Literal["adamw", "sgd", "adam", "rmsprop"] = "adamw"
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0)
    backbone_lr_mult: float = Field(1.0, ge=0)
    head_lr_mult: float = Field(1.0, ge=0)
    loss_lr_mult: float = Field(1.0, ge=0, description="learning-rate multiplier of loss parameters (proxies)")
    eps: float = Field(1e-8, gt=0, description="Adam/AdamW/RMSprop epsilon of every group (ProxyNCA++: 1.0)")
    grad_clip: float | None = Field(None, gt=0, description="max global gradient norm; null = no clipping")


class ScheduleConfig(Section):
    name: Literal["constant", "cosine", "step"] = "cosine"
    warmup_epochs: float = Field(0, ge=0)
    step_epochs: int = Field(10, ge=1, description="step schedule: decay every this many epochs")
    gamma: float = Field(0.1, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of the peak lr")


class TrainConfig(Section):
    epochs: int = Field(20, ge=1)
    iterations_per_epoch: int | None = Field(None, ge=1, description="default: one pass of the sampler")
    amp: bool | Literal["bf16", "fp16"] = Field(
        True, description="mixed precision: bf16 (autocast on CUDA and CPU), fp16 (CUDA, with a GradScaler), "
        "true = fp16 on CUDA and off on CPU, false = off",
    )
    distributed: Literal["auto", "on", "off"] = Field(
        "auto", description="data-parallel training (DDP) over the processes of a torchrun launch: auto = on when "
        "launched by torchrun with WORLD_SIZE > 1",
    )
    eval_every: int = Field(1, ge=1)
    select_metric: str = "map@r"
    select_on: Literal["auto", "val", "last", "test"] = Field(
        "auto",
        description="split whose select_metric picks the reported checkpoint: auto = val if data.val_classes "
        "else last (no selection); 'test' selects on the test classes and every report flags it",
    )
    checkpoint_every: int = Field(1, ge=1)
    log_every: int = Field(10, ge=1)


class EvalConfig(Section):
    ks: list[int] = Field(default_factory=lambda: [1, 2, 4, 8])
    distance: Literal["cosine", "euclidean"] = "cosine"
    batch_size: int = Field(256, ge=1)
    tsne: bool = Field(True, description="2-D t-SNE map of the test embeddings in the report")


class RunConfig(Section):
    seed: int = 0
    deterministic: bool = False
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    data: DataConfig = Field(default_factory=DataConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    objective: list[TermConfig] = Field(
        default_factory=list,
        description="weighted losses and regularisers, e.g. [{name: multi_similarity}, {name: sec, weight: 0.5}]; "
        "replaces `loss` when given",
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    miner: MinerConfig = Field(default_factory=MinerConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    proxies: ProxiesConfig = Field(default_factory=ProxiesConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _batch_fits(self) -> RunConfig:
        if self.sampler.batch_size % self.sampler.m:
            raise ValueError(f"sampler.batch_size ({self.sampler.batch_size}) must be a multiple of sampler.m ({self.sampler.m})")
        if self.objective and self.loss != LossConfig():
            raise ValueError("set either `loss` or `objective` (a list of weighted terms), not both: "
                             "put the loss into the objective list")
        names = [t.name for t in self.objective]
        if len(set(names)) != len(names):
            raise ValueError(f"objective terms must have distinct names, got {names}")
        if self.model.members > 1:
            self._check_members()
        return self

    def _check_members(self) -> None:
        k, size = self.model.members, self.model.embedding_size
        if size % k:
            raise ValueError(f"model.embedding_size ({size}) must be a multiple of model.members ({k}): each member "
                             f"gets embedding_size / members dimensions (e.g. embedding_size={k * max(1, size // k)})")
        if self.model.pretrained and self.model.head_kwargs.get("init") == "identity":
            raise ValueError("model.members > 1 with a pretrained backbone and head_kwargs.init=identity builds k "
                             "identical networks (the members differ by their random initialisation only); "
                             "use the default head init or pretrained=false")
        if self.model.head != "linear":
            raise ValueError(f"model.members > 1 needs model.head=linear (one linear head per member), got {self.model.head!r}")
        coupled = [(what, value) for what, value, used in (
            ("miner.name", self.miner.name, self.miner.name is not None),
            ("memory.size", self.memory.size, self.memory.size > 0),
            ("augment.name", self.augment.name, self.augment.name is not None),
            ("sampler.name", self.sampler.name, self.sampler.name == "fixed_representatives"),
            ("proxies.ccp", self.proxies.ccp, self.proxies.ccp)) if used]
        if coupled:
            raise ValueError(f"model.members > 1 trains each member on its own loss over the same batches; "
                             f"{', '.join(f'{w}={v}' for w, v in coupled)} would couple them and is not supported")

    def terms(self) -> list[TermConfig]:
        """The objective's terms: ``objective`` if given, else the single ``loss`` with weight 1."""
        return list(self.objective) or [TermConfig(name=self.loss.name, **self.loss.kwargs())]

    @property
    def method(self) -> str:
        """A short name of the objective, e.g. ``multi_similarity`` or ``multi_similarity+sec``."""
        return "+".join(t.name for t in self.terms())


def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _section_for(loc: tuple, root: type[BaseModel] | None = None) -> type[BaseModel]:
    model: type[BaseModel] = root or RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            break
    return model


def _format_error(err: ValidationError, root: type[BaseModel] | None = None) -> str:
    """Readable lines for a validation error of ``root`` (default :class:`RunConfig`)."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = _field_names(_section_for(loc, root))
            lines.append(f"unknown key '{key}'.{suggest(str(loc[-1]), valid)} Valid keys here: {', '.join(valid)}")
        elif not loc:
            lines.append(e["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"'{key}': {e['msg']} (got {e.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def validate(raw: dict[str, Any], root: type[BaseModel] | None = None) -> Any:
    """Validate a plain dict into a :class:`RunConfig` (or the schema ``root``, e.g. a protocol's config),
    raising :class:`ConfigError` with readable messages."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a configuration must be a mapping of sections, got {type(raw).__name__}")
    model = root or RunConfig
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, model)) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], value parsed as YAML: numbers, booleans, null, lists)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value (e.g. train.epochs=5), got {item!r}")
    key, value = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set expects key=value, got {item!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def _index(items: list[Any], part: str) -> int | None:
    """``part`` as an index into ``items`` (a list in the config, e.g. ``objective.1.weight``), or None."""
    return int(part) if part.lstrip("-").isdigit() and -len(items) <= int(part) < len(items) else None


def _list_index(item: str, items: list[Any], part: str) -> int:
    index = _index(items, part)
    if index is None:
        raise ConfigError(f"--set {item!r}: '{part}' is not an index of the list {items!r} "
                          f"(0..{len(items) - 1})")
    return index


def lookup(raw: dict[str, Any], key: str) -> Any:
    """The value at ``key`` (``a.b``, numeric parts indexing lists as in ``--set``) of a raw config dict,
    or None when there is none."""
    node: Any = raw
    for part in key.split("."):
        if isinstance(node, list) and (index := _index(node, part)) is not None:
            node = node[index]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw (unvalidated) config dict, in place; returns it. A numeric part
    indexes a list already in the config: ``objective.1.weight=0.5`` sets the second term's weight."""
    for item in overrides:
        path, value = parse_override(item)
        node: Any = raw
        for part in path[:-1]:
            if isinstance(node, list):
                child = node[_list_index(item, node, part)]
            else:
                child = node.setdefault(part, {})
            if not isinstance(child, (dict, list)):
                raise ConfigError(f"--set {item!r}: '{part}' is a value, not a section")
            node = child
        if isinstance(node, list):
            node[_list_index(item, node, path[-1])] = value
        else:
            node[path[-1]] = value
    return raw


def load(path: str | Path | None = None, overrides: list[str] | None = None,
         root: type[BaseModel] | None = None) -> Any:
    """Read a YAML file (or start from the defaults when ``path`` is None), apply overrides, validate
    (as a :class:`RunConfig`, or as ``root``)."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p} is not valid YAML: {exc}") from None
    return validate(apply_overrides(raw, overrides or []), root)


def dump(config: RunConfig) -> str:
    """The resolved configuration as YAML (what a run folder stores as ``config.yaml``)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def check_components(config: RunConfig) -> None:
    """Check registry names and their extra keywords (objective terms, miner, augmenter, sampler, data set)
    without building anything heavy."""
    from deepmetric import augment, data, miners, models, samplers
    from deepmetric.training.objective import term_registry

    samplers.SAMPLERS.check_kwargs(config.sampler.name, config.sampler.kwargs())
    models.HEADS.check_kwargs(config.model.head, config.model.head_kwargs)

    for term in config.terms():
        term_registry(term.name).check_kwargs(term.name, term.kwargs())
    if config.augment.name is not None:
        augment.AUGMENTERS.check_kwargs(config.augment.name, config.augment.kwargs())
    elif config.augment.kwargs():
        raise ConfigError(f"augment options {sorted(config.augment.kwargs())} given but augment.name is not set")
    if config.miner.name is not None:
        miners.MINERS.check_kwargs(config.miner.name, config.miner.kwargs())
    elif config.miner.kwargs():
        raise ConfigError(f"miner options {sorted(config.miner.kwargs())} given but miner.name is not set")
    data.DATASETS.get(config.data.name)
