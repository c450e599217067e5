"""The training step (skips, accumulation, autocast) and the local loop on generated batches."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from albef_ray.config import load_config
from albef_ray.model.albef import build_model
from albef_ray.objectives.mlm import IGNORE
from albef_ray.objectives.pretrain import PretrainTask
from albef_ray.train.loop import Schedule, autocast_context, run_local, split_batch, train_step
from albef_ray.train.optim import build_optimizer
from albef_ray.train.synthetic import SyntheticSpec, synthetic_batches
from tests.conftest import make_batch, tiny_cfg

DEMO = Path(__file__).resolve().parents[2] / "experiments" / "demo_cpu.yaml"
SCHEDULE = Schedule(total_steps=100, steps_per_epoch=10)


def _task(cfg) -> PretrainTask:
    torch.manual_seed(0)
    return PretrainTask(build_model("albef_tiny"), cfg)


def _batch(b=4, t=10, seed=0) -> dict:
    image, ids, att = make_batch(build_model("albef_tiny").arch, b=b, t=t, seed=seed)
    return {"image": image, "input_ids": ids, "attention_mask": att}


class _ScaledLoss(nn.Module):
    """The task with its loss multiplied by ``factor`` (nan / inf make a non-finite step)."""

    def __init__(self, task: nn.Module, factor: float):
        super().__init__()
        self.task, self.factor = task, factor

    def forward(self, *args, **kwargs):
        out = self.task(*args, **kwargs)
        out["loss"] = out["loss"] * self.factor
        return out


@pytest.mark.parametrize("factor", [float("nan"), float("inf")])
def test_non_finite_loss_skips_the_step(factor):
    cfg = tiny_cfg()
    bad = _ScaledLoss(_task(cfg), factor).train()
    opt = build_optimizer(bad, cfg.optim)
    before = copy.deepcopy(bad.task.model.state_dict())

    metrics = train_step(bad, opt, _batch(), 0, cfg, SCHEDULE)

    assert metrics["skipped"] == 1.0
    after = bad.task.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not opt.state  # AdamW moments untouched
    assert all(p.grad is None for p in bad.parameters())

    bad.factor = 1.0  # the same optimizer then steps normally
    metrics = train_step(bad, opt, _batch(), 1, cfg, SCHEDULE)
    assert metrics["skipped"] == 0.0
    assert not torch.equal(before["itm_head.weight"], bad.task.model.itm_head.weight)


def _fixed_inputs(batch: dict, rows: slice, mask_positions: list[tuple[int, int]]) -> dict:
    """Rows of ``batch`` with a fixed MLM mask and in-half ITM negatives (1<->0, 3<->2)."""
    ids = batch["input_ids"][rows]
    masked, labels = ids.clone(), torch.full_like(ids, IGNORE)
    for r, c in mask_positions:
        labels[r, c], masked[r, c] = ids[r, c], 103
    n = ids.shape[0]
    swap = torch.arange(n) ^ 1  # pairs (0, 1), (2, 3): negatives stay inside each half
    return {
        "image": batch["image"][rows], "input_ids": ids, "attention_mask": batch["attention_mask"][rows],
        "mlm_input": (masked, labels), "itm_negatives": (swap, swap),
    }


def test_two_half_batches_accumulate_to_the_full_batch_gradient():
    # ITC's in-batch softmax does not split over micro-batches; ITM and MLM (with equal masked
    # counts per half) are means over rows, so their gradients must match exactly.
    cfg = tiny_cfg(
        itc={"enabled": False}, itm={"hard_negatives": False}, mod={"alpha": 0.0}, train={"precision": "fp32"}
    )
    full_task = _task(cfg).eval()  # eval: no dropout
    half_task = copy.deepcopy(full_task)
    batch = _batch()
    mask = [(0, 2), (1, 3), (2, 4), (3, 5)]
    full = _fixed_inputs(batch, slice(0, 4), mask)
    halves = [_fixed_inputs(batch, slice(0, 2), mask[:2]), _fixed_inputs(batch, slice(2, 4), [(0, 4), (1, 5)])]

    full_opt, half_opt = build_optimizer(full_task, cfg.optim), build_optimizer(half_task, cfg.optim)
    m_full = train_step(full_task, full_opt, [full], 0, cfg, SCHEDULE)
    m_half = train_step(half_task, half_opt, halves, 0, cfg, SCHEDULE)

    assert m_half["loss"] == pytest.approx(m_full["loss"], rel=1e-5)
    assert m_half["grad_norm"] == pytest.approx(m_full["grad_norm"], rel=1e-4)
    grads = dict(half_task.named_parameters())
    checked = 0
    for name, p in full_task.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)
            checked += 1
    assert checked > 50


def test_grad_accum_splits_a_batch_like_explicit_micro_batches():
    cfg = tiny_cfg(optim={"grad_accum": 2})
    split_task, list_task = _task(cfg).eval(), _task(cfg).eval()
    batch = _batch()
    opt_a, opt_b = build_optimizer(split_task, cfg.optim), build_optimizer(list_task, cfg.optim)
    a = train_step(split_task, opt_a, batch, 3, cfg, SCHEDULE, torch.Generator().manual_seed(1))
    halves = split_batch(batch, 2)
    assert [h["input_ids"].shape[0] for h in halves] == [2, 2]
    b = train_step(list_task, opt_b, halves, 3, cfg, SCHEDULE, torch.Generator().manual_seed(1))
    assert a == b
    for (name, p), q in zip(split_task.named_parameters(), list_task.parameters()):
        assert torch.equal(p, q), name


def test_split_batch_refuses_fixed_inputs_and_uneven_parts():
    batch = _fixed_inputs(_batch(), slice(0, 4), [(0, 2)])
    with pytest.raises(ValueError, match="list of micro-batches"):
        split_batch(batch, 2)
    with pytest.raises(ValueError, match="optim.grad_accum"):
        split_batch(_batch(b=4), 3)


def test_step_sets_lr_alpha_and_clips():
    cfg = tiny_cfg(optim={"grad_clip": 1e-3, "warmup_steps": 10, "lr": 1e-4, "warmup_lr": 0.0})
    task = _task(cfg).train()
    opt = build_optimizer(task, cfg.optim)
    m = train_step(task, opt, _batch(), 5, cfg, SCHEDULE)
    assert m["lr"] == pytest.approx(5e-5) and all(g["lr"] == pytest.approx(5e-5) for g in opt.param_groups)
    assert m["alpha"] == pytest.approx(0.4 * 5 / 10)
    assert m["grad_norm"] > 1e-3  # reported before clipping
    clipped = torch.nn.utils.get_total_norm([p.grad for p in task.parameters() if p.grad is not None])
    assert clipped.item() == pytest.approx(1e-3, rel=1e-3)
    assert {"loss", "itc_loss", "itm_loss", "mlm_loss", "skipped"} <= m.keys()


def test_bf16_autocast_context():
    cpu = torch.device("cpu")
    with autocast_context("bf16", cpu):
        assert nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
    with autocast_context("fp32", cpu):
        assert nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32


def test_synthetic_batches_are_deterministic_and_in_vocab():
    cfg = load_config(DEMO)
    spec = SyntheticSpec.from_config(cfg)
    data = synthetic_batches(cfg, 3)
    b = data[1]
    bs = cfg.train.batch_size
    assert b["image"].shape == (bs, 3, 32, 32) and b["input_ids"].shape == (bs, spec.max_text_len)
    assert torch.equal(b["image"], synthetic_batches(cfg, 3)[1]["image"])
    assert not torch.equal(b["image"], data[2]["image"])
    ids = b["input_ids"]
    assert (ids[:, 0] == 101).all() and (ids[:, spec.regions + 1] == 102).all()
    words = ids[:, 1 : spec.regions + 1]
    assert (words > 103).all() and (words < 1000).all()
    assert (ids[b["attention_mask"] == 0] == 0).all()
    assert len(list(data)) == len(data) == 3


def test_demo_loss_falls_within_60_steps():
    cfg = load_config(DEMO, ["train.max_steps=60", "train.log_every_steps=20"])
    lines = []
    history = run_local(cfg, synthetic_batches(cfg, cfg.train.steps_per_epoch), progress=False, log_fn=lines.append)
    assert len(history) == 60 and [h["step"] for h in history] == list(range(60))
    assert history[-1]["epoch"] == 1.0  # 50 steps per epoch
    assert len(lines) == 3 and lines[0].startswith("step 20/60 | loss ")
    first = sum(h["loss"] for h in history[:10]) / 10
    last = sum(h["loss"] for h in history[-10:]) / 10
    assert last < first - 0.7, (first, last)
    assert not any(h["skipped"] for h in history)


def test_schedule_needs_steps_per_epoch_for_unsized_batches():
    cfg = tiny_cfg()
    with pytest.raises(ValueError, match="train.steps_per_epoch"):
        run_local(cfg, iter([_batch()]), progress=False)


def test_training_code_does_not_import_ray():
    code = "import sys, albef_ray.cli, albef_ray.train.loop; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
