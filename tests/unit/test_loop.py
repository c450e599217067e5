"""The training step (skips, accumulation, autocast) and the local loop on generated batches."""

import contextlib
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from albef_ray.config import load_config
from albef_ray.model.albef import build_model
from albef_ray.model.momentum import MomentumEncoder
from albef_ray.objectives.mlm import IGNORE
from albef_ray.objectives.pretrain import PretrainTask
from albef_ray.train.loop import Schedule, optimizer_step_if, run_local, split_batch, train_step
from albef_ray.train.metrics import NonFiniteRun, materialise
from albef_ray.train.optim import build_optimizer
from albef_ray.synth.tensors import SyntheticSpec, synthetic_batches
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
        self.module, self.factor = task, factor  # .module, as DDP keeps it

    def forward(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        out["loss"] = out["loss"] * self.factor
        return out


@pytest.mark.parametrize("factor", [float("nan"), float("inf")])
def test_non_finite_loss_skips_the_step(factor):
    cfg = tiny_cfg()
    bad = _ScaledLoss(_task(cfg), factor).train()
    opt = build_optimizer(bad, cfg.optim)
    before = copy.deepcopy(bad.module.model.state_dict())

    metrics = train_step(bad, opt, _batch(), 0, cfg, SCHEDULE)

    assert metrics["skipped"] == 1.0
    after = bad.module.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # AdamW untouched: the fused kernel skipped on the device verdict (its state may exist, at
    # step 0 with zero moments, exactly as before any step)
    for state in opt.state.values():
        assert float(state["step"]) == 0.0
        assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()

    bad.factor = 1.0  # the same optimizer then steps normally
    metrics = train_step(bad, opt, _batch(), 1, cfg, SCHEDULE)
    assert metrics["skipped"] == 0.0
    assert not torch.equal(before["itm_head.weight"], bad.module.model.itm_head.weight)


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
            # fp32 sums in another order differ by a few ulps of the tensor's largest entries (an AVX2
            # host: 1.5e-7 on an entry near 0, max |grad| 0.34), so the absolute slack scales with them;
            # a micro-batch wrongly weighted would be off by a factor, far outside it.
            scale = float(p.grad.abs().max())
            torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-7 + 1e-5 * scale, msg=name)
            checked += 1
    assert checked > 50


def _momentum_params(task) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in task.momentum.model.named_parameters()}


def _ema(task, momentum: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """m * p_m + (1 - m) * p for every momentum parameter, from the task's online weights now."""
    m, online = task.momentum.momentum, dict(task.model.named_parameters())
    return {n: m * p_m + (1 - m) * online[n].detach() for n, p_m in momentum.items()}


def _assert_params(task, expected: dict[str, torch.Tensor]) -> None:
    for n, p in task.momentum.model.named_parameters():
        torch.testing.assert_close(p, expected[n], rtol=0, atol=1e-6, msg=n)


def _keys(task, image, ids, att) -> tuple[torch.Tensor, torch.Tensor]:
    """The momentum encoder's (image, text) keys of a batch, (E, B) as the queue stores them."""
    with torch.no_grad():
        m = task.momentum.model
        return m.image_features(m.encode_image(image)).T, m.text_features(m.encode_text(ids, att)).T


@pytest.mark.parametrize("accum", [1, 2, 4])
def test_grad_accum_updates_momentum_once_per_optimizer_step(accum):
    cfg = tiny_cfg(optim={"grad_accum": accum}, train={"precision": "fp32"}, mod={"alpha": 0.0})
    torch.manual_seed(0)
    task = PretrainTask(build_model("albef_tiny", text_dropout=0.0), cfg).train()  # keys reproducible
    with torch.no_grad():  # momentum weights apart from the online ones, so each EMA shows
        for p in task.momentum.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    expected = _ema(task, _momentum_params(task))  # one EMA on the weights the step starts from
    batch = _batch()
    opt = build_optimizer(task, cfg.optim)
    metrics = train_step(task, opt, batch, 0, cfg, SCHEDULE, torch.Generator().manual_seed(1))

    assert not metrics["skipped"]
    _assert_params(task, expected)
    # every micro-batch's keys are queued in order, computed after the EMA (the official order)
    assert int(task.momentum.queue_ptr) == 4
    image_keys, text_keys = _keys(task, batch["image"], batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(task.momentum.image_queue[:, :4], image_keys, rtol=0, atol=1e-5)
    torch.testing.assert_close(task.momentum.text_queue[:, :4], text_keys, rtol=0, atol=1e-5)
    # the next step's EMA follows the weights this step produced
    expected = _ema(task, _momentum_params(task))
    train_step(task, opt, _batch(seed=1), 1, cfg, SCHEDULE, torch.Generator().manual_seed(2))
    _assert_params(task, expected)


def test_non_finite_batch_reaches_neither_queue_nor_momentum_encoder():
    cfg = tiny_cfg(train={"precision": "fp32"})
    task = _task(cfg).train()
    mom = task.momentum
    opt = build_optimizer(task, cfg.optim)
    assert not train_step(task, opt, _batch(), 0, cfg, SCHEDULE)["skipped"]
    queues = (mom.image_queue.clone(), mom.text_queue.clone(), mom.index_queue.clone(), int(mom.queue_ptr))
    online = copy.deepcopy(task.model.state_dict())
    after_first = _ema(task, _momentum_params(task))
    bad = _batch(seed=1)
    bad["image"][2] = float("nan")  # one undecodable-looking row

    # The step starts with the EMA of the last good step's weights (official order), then is
    # skipped: nothing of the bad batch stays, on any rank.
    assert train_step(task, opt, bad, 1, cfg, SCHEDULE)["skipped"] == 1.0
    assert torch.equal(mom.image_queue, queues[0]) and torch.equal(mom.text_queue, queues[1])
    assert torch.equal(mom.index_queue, queues[2]) and int(mom.queue_ptr) == queues[3]
    assert torch.isfinite(mom.image_queue).all() and torch.isfinite(mom.text_queue).all()
    assert not mom.pending
    assert all(torch.equal(v, task.model.state_dict()[k]) for k, v in online.items())
    _assert_params(task, after_first)

    # A skipped step moved no weights: the next steps run no EMA until a step is applied.
    assert train_step(task, opt, bad, 2, cfg, SCHEDULE)["skipped"] == 1.0
    assert train_step(task, opt, _batch(seed=2), 3, cfg, SCHEDULE)["skipped"] == 0.0
    _assert_params(task, after_first)
    assert int(mom.queue_ptr) == (queues[3] + 4) % 32 and torch.isfinite(mom.image_queue).all()
    assert mom.ema_due  # step 3 changed the weights: step 4 starts with an EMA


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


def _stub_encoders(task, image_tokens, text_hidden):
    """Encoders replaced by fixed fp32 outputs, so that only the ITC arithmetic sees autocast."""
    for model in (task.model, task.momentum.model):
        model.encode_image = lambda image, _t=image_tokens: _t
        model.encode_text = lambda ids, mask, _t=text_hidden: _t[: ids.shape[0]]


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_bf16_step_computes_itc_in_fp32(alpha):
    cfg = tiny_cfg(
        momentum={"queue_size": 65536}, itm={"enabled": False}, mlm={"enabled": False},
        mod={"mlm": False, "alpha": alpha, "alpha_warmup_epochs": 0},
    )
    task = _task(cfg).train()
    arch = task.model.arch
    g = torch.Generator().manual_seed(0)
    image_tokens = torch.randn(4, 5, arch.vision_width, generator=g)
    text_hidden = torch.randn(4, 10, arch.text_width, generator=g)
    with torch.no_grad():  # logits near 1 / temp = 14, where bf16 resolves 0.0625
        queued = F.normalize(task.momentum.image_queue + 0.3 * torch.randn(256, 65536, generator=g), dim=0)
        task.momentum.image_queue.copy_(queued)
    runs = {}
    for precision in ("fp32", "bf16"):
        twin = copy.deepcopy(task)
        _stub_encoders(twin, image_tokens, text_hidden)
        step_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": precision})})
        opt = build_optimizer(twin, step_cfg.optim)
        runs[precision] = train_step(twin, opt, _batch(), 0, step_cfg, SCHEDULE)
    fp32, bf16 = runs["fp32"]["itc_loss"], runs["bf16"]["itc_loss"]
    assert abs(bf16 - fp32) <= 1e-6 * fp32, (fp32, bf16)
    assert runs["bf16"]["grad_norm"] == pytest.approx(runs["fp32"]["grad_norm"], rel=1e-5)


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
    assert (ids[:, 0] == 101).all() and not (ids == 102).any()  # [CLS] words, no [SEP] (official form)
    assert (b["attention_mask"].sum(1) == spec.regions + 1).all()
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
    def mean(key, steps):
        return sum(h[key] for h in history[steps]) / len(history[steps])

    first, last = slice(0, 10), slice(-10, None)
    assert mean("loss", last) < mean("loss", first) - 0.7, (mean("loss", first), mean("loss", last))
    # MLM alone meets the line above; ITC must learn too (from random weights it moves slowly:
    # 4.54 -> ~4.28 over steps 20-59), and ITM must at least learn its label prior.
    later = slice(20, None)
    assert mean("itc_loss", later) < mean("itc_loss", first) - 0.15, (mean("itc_loss", first), mean("itc_loss", later))
    assert mean("itc_acc", later) > mean("itc_acc", first)
    assert mean("itm_loss", last) < mean("itm_loss", first) < 0.69
    assert not any(h["skipped"] for h in history)


def test_schedule_needs_steps_per_epoch_for_unsized_batches():
    cfg = tiny_cfg()
    with pytest.raises(ValueError, match="train.steps_per_epoch"):
        run_local(cfg, iter([_batch()]), progress=False)


def test_training_code_does_not_import_ray():
    code = "import sys, albef_ray.cli, albef_ray.train.loop; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- no host sync


@contextlib.contextmanager
def _no_host_reads():
    """Every Python-level read of a tensor's value (item, tolist, bool, float, int) raises."""
    names = ("item", "tolist", "__bool__", "__float__", "__int__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"host read inside the step: Tensor.{name} of shape {tuple(self.shape)}")

        return read

    for n in names:
        setattr(torch.Tensor, n, refuse(n))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def test_step_without_sync_reads_no_tensor_back_to_the_host():
    cfg = tiny_cfg(optim={"grad_clip": 1.0, "grad_accum": 2})
    task = _task(cfg).train()
    opt = build_optimizer(task, cfg.optim)
    batches = [_batch(seed=s) for s in range(3)]
    train_step(task, opt, batches[0], 0, cfg, SCHEDULE)  # step 0: the EMA flag becomes a device tensor
    with _no_host_reads():
        out = train_step(task, opt, batches[1], 1, cfg, SCHEDULE, torch.Generator().manual_seed(0), sync=False)
        with pytest.raises(AssertionError, match="host read"):  # the guard itself works
            float(out["loss"])
    assert isinstance(out["loss"], torch.Tensor) and out["loss"].dim() == 0
    assert isinstance(out["skipped"], torch.Tensor) and float(out["skipped"]) == 0.0


def test_sync_flag_changes_only_the_type_of_the_metrics():
    cfg = tiny_cfg(train={"precision": "fp32"})
    runs = []
    for sync in (True, False):
        task = _task(cfg).train()
        opt = build_optimizer(task, cfg.optim)
        rows = [train_step(task, opt, _batch(seed=s), s, cfg, SCHEDULE, torch.Generator().manual_seed(s), sync=sync)
                for s in range(3)]
        runs.append((materialise(rows), task.state_dict()))
    (rows_a, state_a), (rows_b, state_b) = runs
    assert rows_a == rows_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_optimizer_step_if_skips_on_the_device_verdict_and_falls_back_without_fused():
    for fused in (True, False):
        p = nn.Parameter(torch.ones(3))
        opt = torch.optim.AdamW([p], lr=0.1, fused=fused) if fused else torch.optim.SGD([p], lr=0.1)
        p.grad = torch.ones(3)
        optimizer_step_if(opt, torch.tensor(False))
        assert torch.equal(p.detach(), torch.ones(3))
        assert all(float(s.get("step", 0)) == 0 for s in opt.state.values())
        optimizer_step_if(opt, torch.tensor(True))
        assert (p.detach() < 1).all()
        assert not hasattr(opt, "found_inf")  # the verdict does not stay on the optimizer


def test_gated_queue_write_and_ema_equal_the_plain_ones_or_leave_everything_as_it_was():
    torch.manual_seed(0)
    model = build_model("albef_tiny")
    feats = [F.normalize(torch.randn(4, 256), dim=1) for _ in range(2)]
    index = torch.arange(4)
    plain, gated, refused = (MomentumEncoder(model, 0.9, 8, index_queue=True) for _ in range(3))
    for enc in (gated, refused):
        enc.load_state_dict(plain.state_dict())
    for _ in range(3):  # wraps around the 8-slot queue
        plain.enqueue(*feats, index=index)
        gated.enqueue(*feats, index=index, applied=torch.tensor(True))
        refused.enqueue(*feats, index=index, applied=torch.tensor(False))
    for k, v in plain.state_dict().items():
        assert torch.equal(v, gated.state_dict()[k]), k
    assert int(refused.queue_ptr) == 0 and not torch.equal(refused.image_queue, plain.image_queue)

    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    before = copy.deepcopy(refused.model.state_dict())
    refused.ema_due = torch.tensor(False)
    refused.update(model)
    assert all(torch.equal(v, refused.model.state_dict()[k]) for k, v in before.items())
    gated.ema_due = torch.tensor(True)
    gated.update(model)
    plain.update(model)
    for k, v in plain.model.state_dict().items():
        torch.testing.assert_close(gated.model.state_dict()[k], v, rtol=0, atol=1e-7, msg=k)


def test_non_finite_run_counts_the_longest_run_between_reads():
    run = NonFiniteRun()
    for skipped in (0.0, 1.0, 1.0, 1.0, 0.0, 1.0):
        run.add(torch.tensor(skipped))
    assert run.read() == (1, 3)  # 3 in a row, then a good step, then 1 still running
    run.add(torch.tensor(1.0))
    assert run.read() == (2, 2)
    resumed = NonFiniteRun(2)  # a checkpoint's count carries on
    resumed.add(1.0)
    assert resumed.read() == (3, 3)


def test_hard_negatives_start_at_the_switch_step(monkeypatch):
    from albef_ray.objectives import blocks

    seen = []
    real = blocks.itm_pairs

    def recording(*args, **kwargs):
        seen.append(args[4])  # itm_pairs(text, mask, sim_i2t, sim_t2i, hard, ...)
        return real(*args, **kwargs)

    monkeypatch.setattr(blocks, "itm_pairs", recording)
    cfg = tiny_cfg(itm={"hard_negatives_from_step": 2})
    task = _task(cfg).train()
    opt = build_optimizer(task, cfg.optim)
    for step in range(4):
        train_step(task, opt, _batch(seed=step), step, cfg, SCHEDULE)
    assert seen == [False, False, True, True]


def test_before_the_switch_a_step_equals_one_with_uniform_negatives():
    losses = []
    for itm in ({"hard_negatives_from_step": 5}, {"hard_negatives": False}, {}):
        cfg = tiny_cfg(itm=itm)
        task = _task(cfg).train()
        metrics = train_step(task, build_optimizer(task, cfg.optim), _batch(), 0, cfg, SCHEDULE,
                             torch.Generator().manual_seed(0))
        losses.append(metrics["itm_loss"])
    assert losses[0] == losses[1] != losses[2]  # uniform == uniform; hard negatives differ


def test_the_switch_is_for_pretraining_only():
    from albef_ray.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="itm.hard_negatives_from_step"):
        build_config({"task": "retrieval", "mlm": {"enabled": False}, "itm": {"hard_negatives_from_step": 10}})
