"""ITC / ITM / MLM math and the switches of the pretraining task."""

import math

import pytest
import torch
import torch.nn.functional as F

from albef_ray.model.albef import build_model
from albef_ray.objectives.itc import itc_loss, itc_targets, soft_cross_entropy
from albef_ray.objectives.itm import itm_loss, sample_negatives
from albef_ray.objectives.mlm import IGNORE, SpecialTokens, mask_tokens, mlm_loss
from albef_ray.objectives.pretrain import PretrainTask
from tests.conftest import make_batch, tiny_cfg

# ----------------------------------------------------------------------------------- ITC


def test_itc_alpha0_is_cross_entropy_on_diagonal():
    sim_i2t, sim_t2i = torch.randn(4, 12), torch.randn(4, 12)
    out = itc_loss(sim_i2t, sim_t2i, itc_targets(sim_i2t), itc_targets(sim_t2i, torch.randn(4, 12), 0.0))
    labels = torch.arange(4)
    expected = (F.cross_entropy(sim_i2t, labels) + F.cross_entropy(sim_t2i, labels)) / 2
    torch.testing.assert_close(out["itc_loss"], expected)


def test_itc_mod_targets_are_mixture():
    sim, sim_m = torch.randn(3, 7), torch.randn(3, 7)
    t = itc_targets(sim, sim_m, 0.4)
    torch.testing.assert_close(t.sum(1), torch.ones(3))
    expected = 0.4 * sim_m.softmax(1) + 0.6 * torch.eye(3, 7)
    torch.testing.assert_close(t, expected)


def test_soft_cross_entropy_by_hand():
    logits = torch.tensor([[math.log(1.0), math.log(3.0)]])  # softmax = [0.25, 0.75]
    targets = torch.tensor([[0.5, 0.5]])
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert soft_cross_entropy(logits, targets).item() == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------------- ITM


@pytest.mark.parametrize("hard", [True, False])
def test_negative_is_never_the_positive(hard):
    g = torch.Generator().manual_seed(0)
    b = 5
    sim = torch.randn(b, b + 10) * 20
    sim[:, :b] += torch.eye(b) * 100  # positives dominate: a naive sampler would pick them
    for _ in range(50):
        neg_image, neg_text = sample_negatives(sim, sim.clone(), b, hard, g)
        assert (neg_image != torch.arange(b)).all() and (neg_text != torch.arange(b)).all()
        assert neg_image.max() < b and neg_text.max() < b


def test_hard_negatives_follow_similarity():
    g = torch.Generator().manual_seed(0)
    sim = torch.zeros(3, 3)
    sim[0, 2] = 10.0  # for image 0, text 2 is by far the most similar non-positive
    counts = torch.zeros(3)
    for _ in range(200):
        _, neg_text = sample_negatives(sim, sim.T.contiguous(), 3, True, g)
        counts[neg_text[0]] += 1
    assert counts[2] > 190 and counts[0] == 0


@pytest.mark.parametrize(
    "sim",
    [torch.zeros(4, 4), torch.full((4, 4), float("nan")), torch.full((4, 4), float("inf")),
     torch.tensor([[1e9, -1e9, -1e9, -1e9]] * 4)],
    ids=["all-equal", "nan", "inf", "one-hot-on-positive"],
)
def test_sampling_never_fails_on_degenerate_similarities(sim):
    neg_image, neg_text = sample_negatives(sim, sim, 4, True, torch.Generator().manual_seed(0))
    assert (neg_image != torch.arange(4)).all() and (neg_text != torch.arange(4)).all()


def test_itm_loss_labels():
    logits = torch.tensor([[0.0, 5.0], [5.0, 0.0], [5.0, 0.0]])  # 1 positive, 2 negatives, all right
    out = itm_loss(logits, num_positive=1)
    assert out["itm_acc"].item() == 1.0
    assert out["itm_loss"].item() == pytest.approx(F.cross_entropy(logits, torch.tensor([1, 0, 0])).item())


# ----------------------------------------------------------------------------------- MLM


def test_masking_statistics_and_specials():
    special = SpecialTokens()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(200, 1000, (400, 50), generator=g)
    ids[:, 0], ids[:, 40] = special.cls, special.sep
    ids[:, 41:] = special.pad
    ids[:, 5] = special.unk
    masked, labels = mask_tokens(ids, 1000, special, 0.15, 0.8, 0.1, g)
    chosen = labels != IGNORE
    specials = (ids == special.cls) | (ids == special.sep) | (ids == special.pad) | (ids == special.unk)
    assert not (chosen & specials).any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[specials], ids[specials])
    frac = chosen.sum() / (~specials).sum()
    assert abs(frac.item() - 0.15) < 0.01
    n = chosen.sum().item()
    to_mask = (masked == special.mask) & chosen
    changed = (masked != ids) & chosen & ~to_mask
    kept = (masked == ids) & chosen
    assert abs(to_mask.sum().item() / n - 0.8) < 0.02
    # random replacements that happen to draw the same id count as "kept" (p = 1/1000)
    assert abs(changed.sum().item() / n - 0.1) < 0.015 and abs(kept.sum().item() / n - 0.1) < 0.015
    assert not (~chosen & (masked != ids)).any()


def test_mlm_loss_plain_and_distilled():
    logits, labels = torch.randn(6, 11, requires_grad=True), torch.randint(11, (6,))
    ce = F.cross_entropy(logits, labels)
    torch.testing.assert_close(mlm_loss(logits, labels)["mlm_loss"], ce)
    soft = torch.softmax(torch.randn(6, 11), -1)
    distill = -(F.log_softmax(logits, -1) * soft).sum(-1).mean()
    torch.testing.assert_close(mlm_loss(logits, labels, soft, 0.4)["mlm_loss"], 0.6 * ce + 0.4 * distill)


def test_zero_masked_batch_is_finite_and_backpropagates():
    logits = torch.randn(0, 11, requires_grad=True)
    out = mlm_loss(logits, torch.zeros(0, dtype=torch.long), torch.zeros(0, 11), 0.4)
    assert torch.isfinite(out["mlm_loss"]) and out["mlm_loss"].item() == 0.0
    out["mlm_loss"].backward()


# ------------------------------------------------------------------------- pretrain task


def _run(cfg, b=4, alpha=0.4, **kw):
    model = build_model("albef_tiny")
    task = PretrainTask(model, cfg)
    image, ids, att = make_batch(model.arch, b=b)
    return task, task(image, ids, att, alpha=alpha, generator=torch.Generator().manual_seed(0), **kw)


@pytest.mark.parametrize(
    "switches, keys",
    [
        ({}, {"itc_loss", "itm_loss", "mlm_loss"}),
        ({"itc": {"enabled": False}, "itm": {"hard_negatives": False}, "mod": {"itc": False}}, {"itm_loss", "mlm_loss"}),
        ({"mlm": {"enabled": False}, "mod": {"mlm": False}}, {"itc_loss", "itm_loss"}),
        ({"itm": {"enabled": False}}, {"itc_loss", "mlm_loss"}),
    ],
)
def test_switches_decide_which_losses_exist(switches, keys):
    _, out = _run(tiny_cfg(**switches))
    assert {k for k in out if k.endswith("_loss")} == keys
    assert torch.isfinite(out["loss"])
    torch.testing.assert_close(out["loss"], sum(out[k] for k in keys))


def test_table1_baseline_has_no_momentum_encoder():
    cfg = tiny_cfg(itc={"enabled": False}, itm={"hard_negatives": False}, mod={"itc": False, "mlm": False})
    task, _ = _run(cfg)
    assert task.momentum is None


def test_loss_weights_apply():
    _, base = _run(tiny_cfg())
    _, weighted = _run(tiny_cfg(itc={"weight": 2.0}, mlm={"weight": 0.0}))
    torch.testing.assert_close(weighted["loss"], 2 * weighted["itc_loss"] + weighted["itm_loss"])


def test_step_enqueues_and_updates_momentum():
    cfg = tiny_cfg()
    task, out = _run(cfg)
    assert int(task.momentum.queue_ptr) == 4
    out["loss"].backward()
    grads = [n for n, p in task.named_parameters() if p.grad is not None]
    assert any(n.startswith("model.vision") for n in grads) and any(n.startswith("model.fusion") for n in grads)
    assert not any(n.startswith("momentum") for n in grads)


def test_batch_of_one_does_not_fail():
    cfg = tiny_cfg(train={"batch_size": 1})
    _, out = _run(cfg, b=1)
    assert torch.isfinite(out["loss"]) and "itm_loss" in out


def test_temperature_is_clamped():
    cfg = tiny_cfg()
    model = build_model("albef_tiny")
    task = PretrainTask(model, cfg)
    with torch.no_grad():
        model.temp.fill_(5.0)
    image, ids, att = make_batch(model.arch)
    out = task(image, ids, att)
    assert out["temp"].item() == pytest.approx(0.5)


def test_eval_mode_is_deterministic_given_masks_and_negatives():
    cfg = tiny_cfg()
    model = build_model("albef_tiny")
    task = PretrainTask(model, cfg).eval()
    image, ids, att = make_batch(model.arch)
    masked, labels = mask_tokens(ids, model.arch.vocab_size, SpecialTokens(), 0.5, generator=torch.Generator().manual_seed(3))
    kw = dict(mlm_input=(masked, labels), itm_negatives=(torch.tensor([1, 0, 3, 2]), torch.tensor([2, 3, 0, 1])))
    a, b = task(image, ids, att, 0.4, **kw), task(image, ids, att, 0.4, **kw)
    for k in ("loss", "itc_loss", "itm_loss", "mlm_loss"):
        assert torch.equal(a[k], b[k])
