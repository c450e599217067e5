"""The config tree: paper defaults, YAML of differences, overrides, dotted names, cross-field checks."""

from pathlib import Path

import pytest
import yaml

from albef_ray.config import (
    AlbefConfig,
    ConfigError,
    build_config,
    dump_yaml,
    flatten,
    load_config,
    load_yaml,
    parse_override,
)
from albef_ray.model.registry import get_arch

EXPERIMENTS = sorted((Path(__file__).resolve().parents[2] / "experiments").glob("*.yaml"))


def test_defaults_are_the_papers():
    cfg = AlbefConfig()
    assert cfg.optim.lr == 1e-4 and cfg.optim.min_lr == 1e-5
    assert cfg.optim.weight_decay == 0.02
    assert cfg.momentum.queue_size == 65536 and cfg.momentum.momentum == 0.995
    assert cfg.mod.alpha == 0.4 and cfg.mod.alpha_warmup_epochs == 1.0
    assert cfg.mlm.probability == 0.15
    assert cfg.model.temp == 0.07 and cfg.model.embed_dim == 256
    assert (cfg.train.batch_size, cfg.train.num_workers) == (64, 8)
    assert cfg.train.epochs == 30
    assert cfg.itc.enabled and cfg.itm.enabled and cfg.itm.hard_negatives and cfg.mlm.enabled
    assert cfg.model.size == "albef_base" and cfg.model.image_res is None
    assert get_arch(cfg.model.size, cfg.model.image_res).image_res == 256


def test_yaml_file_holds_only_differences(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("optim:\n  lr: 2.0e-4\ntrain:\n  batch_size: 32\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 2e-4 and cfg.train.batch_size == 32
    defaults, loaded = flatten(AlbefConfig()), flatten(cfg)
    assert {k for k in loaded if loaded[k] != defaults[k]} == {"optim.lr", "train.batch_size"}


def test_base_file_is_merged_under(tmp_path):
    (tmp_path / "base.yaml").write_text("optim: {lr: 2.0e-4, warmup_steps: 10}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\noptim: {warmup_steps: 20}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.optim.lr, cfg.optim.warmup_steps) == (2e-4, 20)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_files_are_valid_and_restate_no_default(path):
    load_config(path)
    defaults = flatten(AlbefConfig())
    with path.open() as f:
        own = {k: v for k, v in flatten(yaml.safe_load(f)).items() if k != "base"}
    restated = [k for k, v in own.items() if defaults.get(k) == v]
    assert not restated, f"{path.name} restates defaults: {restated}"


def test_experiment_files_exist():
    assert {p.name for p in EXPERIMENTS} >= {"demo_cpu.yaml", "pretrain_4m.yaml", "pretrain_14m.yaml"}


@pytest.mark.parametrize(
    "text, key, value",
    [
        ("optim.lr=2e-4", "optim.lr", 2e-4),
        ("optim.lr=0.0002", "optim.lr", 2e-4),
        ("train.max_steps=10", "train.max_steps", 10),
        ("train.use_gpu=false", "train.use_gpu", False),
        ("model.vit_init=null", "model.vit_init", None),
        ("model.size=albef_tiny", "model.size", "albef_tiny"),
        ("data.shards=[a, b]", "data.shards", ["a", "b"]),
    ],
)
def test_overrides_parse_types(text, key, value):
    parsed_key, parsed = parse_override(text)
    assert parsed_key == key and parsed == value and type(parsed) is type(value)


def test_override_reaches_the_typed_field():
    cfg = load_config(None, ["optim.lr=2e-4", "optim.betas=[0.9, 0.98]", "train.precision=fp32"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 2e-4
    assert cfg.optim.betas == (0.9, 0.98) and cfg.train.precision == "fp32"


def test_flatten_gives_dotted_keys():
    cfg = AlbefConfig()
    flat = flatten(cfg)
    assert flat["optim.lr"] == 1e-4 and flat["momentum.queue_size"] == 65536 and flat["name"] == "albef"
    for key, value in flat.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert node == value, key
    assert not any(isinstance(v, dict) for v in flat.values())


def test_dump_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["optim.lr=3e-4", "model.size=albef_tiny"])
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "data, path",
    [
        ({"itc": {"enabled": False}}, "itm.hard_negatives"),  # hard negatives come from ITC similarities
        ({"momentum": {"queue_size": 1000}}, "momentum.queue_size"),  # not a multiple of 64 x 8
        ({"train": {"batch_size": 48}}, "momentum.queue_size"),  # 65536 % (48 x 8) != 0
        ({"optim": {"min_lr": 1e-3}}, "optim.min_lr"),
        ({"itc": {"enabled": False}, "itm": {"hard_negatives": False}}, "mod.itc"),  # MoD of ITC needs ITC
        ({"optim": {"lr": "fast"}}, "optim.lr"),
        ({"train": {"precision": "fp8"}}, "train.precision"),
        ({"optim": {"lrr": 1.0}}, "optim.lrr"),
        ({"model": {"size": "albef_huge"}}, "model.size"),
        ({"optim": {"grad_accum": 3}}, "optim.grad_accum"),  # 64 does not split into 3
    ],
)
def test_inconsistent_or_bad_values_name_the_dotted_path(data, path):
    with pytest.raises(ConfigError) as err:
        build_config(data)
    assert str(err.value).startswith(f"{path}: "), str(err.value)


def test_consistent_ablation_combinations_pass():
    cfg = build_config({"itc": {"enabled": False}, "itm": {"hard_negatives": False}, "mod": {"itc": False}})
    assert not cfg.itc.enabled and cfg.uses_momentum  # MoD of MLM still needs the momentum model
    assert not build_config({"itc": {"enabled": False}, "itm": {"hard_negatives": False},
                             "mod": {"alpha": 0.0}}).uses_momentum


def test_missing_file_and_non_mapping_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "none.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_yaml(tmp_path / "list.yaml")
