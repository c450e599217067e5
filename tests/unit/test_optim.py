"""AdamW parameter groups and the lr / alpha schedules."""

import math

import pytest
import torch
from torch import nn

from albef_ray.config import MoDConfig, OptimConfig
from albef_ray.tasks import build_task
from albef_ray.train.optim import alpha_at, build_optimizer, lr_at, no_decay_names, set_lr
from tests.conftest import tiny_cfg

# warm-up 10 steps from 1e-5 to 1e-4, then cosine to 1e-5 over the remaining 100 of 110 steps.
OPTIM = OptimConfig(lr=1e-4, warmup_lr=1e-5, min_lr=1e-5, warmup_steps=10)
TOTAL = 110


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 1e-5),  # warm-up start
        (5, 5.5e-5),  # half-way up: 1e-5 + 0.5 * 9e-5
        (10, 1e-4),  # end of warm-up = peak
        (35, 1e-5 + 0.5 * 9e-5 * (1 + math.cos(math.pi / 4))),  # a quarter into the cosine
        (60, 5.5e-5),  # cosine midpoint: (lr + min_lr) / 2
        (110, 1e-5),  # end
        (500, 1e-5),  # held after the end
    ],
)
def test_lr_at_hand_computed_steps(step, expected):
    assert lr_at(step, OPTIM, TOTAL) == pytest.approx(expected, rel=1e-12)


def test_lr_rises_then_falls_monotonically():
    lrs = [lr_at(s, OPTIM, TOTAL) for s in range(TOTAL + 1)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_lr_without_warmup_starts_at_peak():
    cfg = OptimConfig(lr=2e-4, min_lr=0.0, warmup_steps=0)
    assert lr_at(0, cfg, 100) == pytest.approx(2e-4)
    assert lr_at(50, cfg, 100) == pytest.approx(1e-4)
    assert lr_at(100, cfg, 100) == pytest.approx(0.0)


def test_lr_when_the_run_is_all_warmup():
    cfg = OptimConfig(warmup_steps=100)
    assert lr_at(100, cfg, total_steps=50) == cfg.lr


@pytest.mark.parametrize(
    "step, expected",
    [(0, 0.0), (25, 0.1), (50, 0.2), (99, 0.4 * 99 / 100), (100, 0.4), (10_000, 0.4)],
)
def test_alpha_ramps_over_the_first_epoch(step, expected):
    assert alpha_at(step, steps_per_epoch=100, cfg=MoDConfig()) == pytest.approx(expected)


def test_alpha_warmup_in_epochs():
    cfg = MoDConfig(alpha=0.5, alpha_warmup_epochs=2.5)
    assert alpha_at(125, 100, cfg) == pytest.approx(0.25)
    assert alpha_at(250, 100, cfg) == pytest.approx(0.5)
    assert alpha_at(0, 100, MoDConfig(alpha_warmup_epochs=0)) == pytest.approx(0.4)


def _expected_no_decay(task: nn.Module) -> set[str]:
    """Biases, LayerNorm weights, the temperature and the ViT's cls_token / pos_embed, by module type."""
    names = set()
    for mod_name, module in task.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p.requires_grad and (p_name == "bias" or isinstance(module, nn.LayerNorm)):
                names.add(full)
    return names | {"model.temp", "model.vision.vit.cls_token", "model.vision.vit.pos_embed"}


def test_no_decay_is_exactly_biases_norms_temp_and_vit_tokens():
    task = build_task(tiny_cfg())
    assert no_decay_names(task) == _expected_no_decay(task)


def test_param_groups_cover_trainable_params_once_and_skip_momentum():
    task = build_task(tiny_cfg())
    opt = build_optimizer(task, OPTIM)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["decay"]["weight_decay"] == OPTIM.weight_decay == 0.02
    assert groups["no_decay"]["weight_decay"] == 0.0

    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    trainable = {id(p) for p in task.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable
    momentum = {id(p) for p in task.momentum.parameters()}
    assert momentum and not momentum & set(ids)

    names = {id(p): n for n, p in task.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert no_decay == _expected_no_decay(task)
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert {"model.text.embeddings.word.weight", "model.vision_proj.weight", "model.itm_head.weight"} <= decay


def test_build_optimizer_settings_and_set_lr():
    task = build_task(tiny_cfg())
    opt = build_optimizer(task, OPTIM)
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["lr"] == OPTIM.warmup_lr and g["betas"] == (0.9, 0.999) for g in opt.param_groups)
    set_lr(opt, 3e-4)
    assert all(g["lr"] == 3e-4 for g in opt.param_groups)
