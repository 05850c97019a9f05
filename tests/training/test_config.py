from pathlib import Path

import pytest
import yaml

from deepmetric.errors import ConfigError, UnknownNameError
from deepmetric.training import config as C

ROOT = Path(__file__).resolve().parents[2]


def test_digits_yaml_is_the_default():
    from_file = C.load(ROOT / "configs" / "digits.yaml")
    assert from_file == C.RunConfig()


def test_overrides_are_parsed_as_yaml():
    cfg = C.load(None, ["train.epochs=3", "eval.ks=[1,5]", "model.normalize=false", "loss.alpha=3.5",
                        "data.val_classes=0.4", "miner.name=null"])
    assert cfg.train.epochs == 3 and cfg.eval.ks == [1, 5] and cfg.model.normalize is False
    assert cfg.loss.kwargs() == {"alpha": 3.5} and cfg.data.val_classes == 0.4


def test_unknown_key_names_it_and_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        C.load(None, ["train.epoks=3"])
    msg = str(err.value)
    assert "train.epoks" in msg and "Did you mean 'epochs'" in msg and "iterations_per_epoch" in msg


def test_unknown_top_level_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"optimiser": {"lr": 0.1}}))
    with pytest.raises(ConfigError, match="'optimiser'.*Did you mean 'optimizer'"):
        C.load(path)


def test_wrong_type_and_choice():
    with pytest.raises(ConfigError, match="train.epochs"):
        C.load(None, ["train.epochs=many"])
    with pytest.raises(ConfigError, match="optimizer.name.*adamw"):
        C.load(None, ["optimizer.name=adamm"])
    with pytest.raises(ConfigError, match="multiple of sampler.m"):
        C.load(None, ["sampler.batch_size=30"])


def test_bad_override_syntax_and_files(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        C.load(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="not found"):
        C.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        C.load(bad)


def test_component_keywords_are_checked():
    with pytest.raises(ConfigError, match="has no parameter 'alpah'.*Did you mean 'alpha'"):
        C.check_components(C.load(None, ["loss.alpah=2"]))
    with pytest.raises(UnknownNameError, match="unknown loss or regulariser 'multi_similarty'.*Did you mean 'multi_similarity'"):
        C.check_components(C.load(None, ["loss.name=multi_similarty"]))
    with pytest.raises(ConfigError, match="miner.name is not set"):
        C.check_components(C.load(None, ["miner.epsilon=0.1"]))


def test_dump_round_trips(tmp_path):
    cfg = C.load(None, ["loss.beta=40", "train.epochs=7"])
    path = tmp_path / "c.yaml"
    path.write_text(C.dump(cfg))
    assert C.load(path) == cfg


def test_a_numeric_part_indexes_a_list():
    terms = "objective=[{name: multi_similarity}, {name: sec, weight: 0.5}]"
    cfg = C.load(None, [terms, "objective.1.weight=0.2", "objective.0.alpha=3", "objective.-1.name=lsd"])
    assert [(t.name, t.weight) for t in cfg.terms()] == [("multi_similarity", 1.0), ("lsd", 0.2)]
    assert cfg.terms()[0].kwargs() == {"alpha": 3}
    for bad in ("objective.2.weight=1", "objective.x.weight=1"):
        with pytest.raises(ConfigError, match="not an index of the list"):
            C.load(None, [terms, bad])
    with pytest.raises(ConfigError, match="'weight' is a value, not a section"):
        C.load(None, [terms, "objective.1.weight.x=1"])


def test_lookup_reads_what_set_writes():
    raw = {"objective": [{"name": "multi_similarity"}, {"name": "sec", "weight": 0.5}], "train": {"epochs": 3}}
    assert C.lookup(raw, "objective.1.weight") == 0.5 and C.lookup(raw, "objective.-1.name") == "sec"
    assert C.lookup(raw, "train.epochs") == 3
    assert C.lookup(raw, "objective.2.weight") is None and C.lookup(raw, "train.lr") is None
