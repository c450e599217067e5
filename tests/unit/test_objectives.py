"""ITC / ITM / MLM math and the switches of the pretraining task."""

import math

import pytest
import torch
import torch.nn.functional as F

from albef_ray.model.albef import build_model
from albef_ray.model.momentum import MomentumEncoder
from albef_ray.objectives.blocks import (
    FusionRows,
    clamp_temperature,
    finish_queue,
    fuse_rows,
    itm_head,
    itm_rows,
    itm_step,
    loss_weights,
    momentum_forward,
    weighted_loss,
)
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
    torch.manual_seed(0)
    model = build_model("albef_tiny", text_dropout=0.0)
    task = PretrainTask(model, cfg).train()
    with torch.no_grad():  # momentum weights apart from the online ones, so the EMA shows
        for p in task.momentum.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m = cfg.momentum.momentum
    online = dict(model.named_parameters())
    expected = {n: m * p.detach() + (1 - m) * online[n].detach() for n, p in task.momentum.model.named_parameters()}
    image, ids, att = make_batch(model.arch, b=4)
    out = task(image, ids, att, alpha=0.4, generator=torch.Generator().manual_seed(0))

    for n, p in task.momentum.model.named_parameters():
        torch.testing.assert_close(p, expected[n], rtol=0, atol=1e-6, msg=n)
    assert int(task.momentum.queue_ptr) == 4
    with torch.no_grad():  # the queued keys come from the updated momentum encoder (official order)
        mm = task.momentum.model
        keys = mm.image_features(mm.encode_image(image)).T, mm.text_features(mm.encode_text(ids, att)).T
    torch.testing.assert_close(task.momentum.image_queue[:, :4], keys[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(task.momentum.text_queue[:, :4], keys[1], rtol=0, atol=1e-5)
    assert task.momentum.index_queue[:4].eq(-1).all()  # no image_idx: no known image
    out["loss"].backward()
    grads = [n for n, p in task.named_parameters() if p.grad is not None]
    assert any(n.startswith("model.vision") for n in grads) and any(n.startswith("model.fusion") for n in grads)
    assert not any(n.startswith("momentum") for n in grads)


def test_batch_of_one_has_positive_only_itm_and_one_itc_column_of_its_own():
    cfg = tiny_cfg(train={"batch_size": 1}, mod={"alpha": 0.0})
    torch.manual_seed(0)
    model = build_model("albef_tiny")
    task = PretrainTask(model, cfg).train()
    image, ids, att = make_batch(model.arch, b=1)
    before = {n: p.detach().clone() for n, p in task.momentum.model.named_parameters()}
    out = task(image, ids, att, generator=torch.Generator().manual_seed(0), return_outputs=True)
    assert out["itm_logits"].shape == (1, 2) and "neg_image" not in out  # no negative to pair with
    torch.testing.assert_close(out["itm_loss"], -F.log_softmax(out["itm_logits"], dim=1)[0, 1])
    assert out["sim_i2t"].shape == (1, 1 + cfg.momentum.queue_size)
    expected_itc = (F.cross_entropy(out["sim_i2t"], torch.tensor([0])) + F.cross_entropy(out["sim_t2i"], torch.tensor([0]))) / 2
    torch.testing.assert_close(out["itc_loss"], expected_itc)
    torch.testing.assert_close(out["loss"], out["itc_loss"] + out["itm_loss"] + out["mlm_loss"])
    assert int(task.momentum.queue_ptr) == 1
    m, online = cfg.momentum.momentum, dict(model.named_parameters())
    for n, p in task.momentum.model.named_parameters():
        torch.testing.assert_close(p, m * before[n] + (1 - m) * online[n].detach(), rtol=0, atol=1e-6, msg=n)


def test_same_image_captions_are_not_negatives_in_pretraining():
    cfg = tiny_cfg(mod={"alpha": 0.0})
    torch.manual_seed(0)
    model = build_model("albef_tiny")
    task = PretrainTask(model, cfg).eval()  # no EMA / enqueue: every call sees the same state
    image, ids, att = make_batch(model.arch, b=4)
    image[1] = image[0]  # rows 0 and 1: two captions of one image, the likeliest hard negatives
    idx = torch.tensor([7, 7, 8, 9])
    for seed in range(30):
        out = task(image, ids, att, generator=torch.Generator().manual_seed(seed), image_idx=idx, return_outputs=True)
        assert (idx[out["neg_image"]] != idx).all() and (idx[out["neg_text"]] != idx).all(), seed
    # ITC: both captions are targets of the image and vice versa, split evenly
    target = out["target_i2t"][:, :4]
    torch.testing.assert_close(target[0], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(target[2], torch.tensor([0.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(out["target_t2i"], out["target_i2t"])


def test_queued_captions_of_the_same_image_are_itc_positives():
    cfg = tiny_cfg(mod={"alpha": 0.0})
    torch.manual_seed(0)
    task = PretrainTask(build_model("albef_tiny"), cfg).train()
    image, ids, att = make_batch(task.model.arch, b=4)
    task(image, ids, att, generator=torch.Generator().manual_seed(0), image_idx=torch.tensor([1, 2, 3, 4]))
    assert task.momentum.index_queue[:4].tolist() == [1, 2, 3, 4]
    out = task(image, ids, att, generator=torch.Generator().manual_seed(1), image_idx=torch.tensor([5, 2, 6, 7]),
               return_outputs=True)
    row = out["target_i2t"][1]  # image 2: its caption in the batch (column 1) and in the queue (4 + 1)
    assert row.nonzero().flatten().tolist() == [1, 5] and torch.allclose(row[[1, 5]], torch.tensor([0.5, 0.5]))
    assert torch.equal(out["target_i2t"][0], torch.eye(4, 4 + 32)[0])


def test_without_image_idx_targets_are_the_official_diagonal():
    cfg = tiny_cfg(mod={"alpha": 0.0})
    torch.manual_seed(0)
    task = PretrainTask(build_model("albef_tiny"), cfg).eval()
    image, ids, att = make_batch(task.model.arch, b=4)
    image[1] = image[0]
    out = task(image, ids, att, generator=torch.Generator().manual_seed(0), return_outputs=True)
    assert torch.equal(out["target_i2t"], torch.eye(4, 4 + 32)) and torch.equal(out["target_t2i"], out["target_i2t"])


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


# ------------------------------------------------------------------------ shared blocks


def test_weighted_loss_sums_present_losses_with_their_weights():
    out = {"itc_loss": torch.tensor(2.0), "mlm_loss": torch.tensor(3.0), "itc_acc": torch.tensor(9.0),
           "temp": torch.tensor(0.07)}
    weights = {"itc_loss": 0.5, "itm_loss": 10.0, "mlm_loss": 2.0}  # no itm_loss in out: adds nothing
    assert weighted_loss(out, weights).item() == pytest.approx(0.5 * 2.0 + 2.0 * 3.0)


def test_weighted_loss_refuses_a_loss_without_a_weight():
    with pytest.raises(KeyError, match="vqa_loss"):
        weighted_loss({"itc_loss": torch.tensor(1.0), "vqa_loss": torch.tensor(1.0)}, {"itc_loss": 1.0})


def test_weighted_loss_keeps_the_gradient_of_each_term():
    a, b = torch.tensor(1.0, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    weighted_loss({"itc_loss": a, "itm_loss": b}, {"itc_loss": 0.3, "itm_loss": 4.0}).backward()
    assert a.grad.item() == pytest.approx(0.3) and b.grad.item() == pytest.approx(4.0)


def test_loss_weights_come_from_the_config():
    cfg = tiny_cfg(itc={"weight": 0.3}, itm={"weight": 2.0}, mlm={"weight": 0.0})
    assert loss_weights(cfg) == {"itc_loss": 0.3, "itm_loss": 2.0, "mlm_loss": 0.0}


@pytest.mark.parametrize("start, expected", [(5.0, 0.2), (1e-5, 0.01), (0.07, 0.07)])
def test_clamp_temperature_bounds(start, expected):
    cfg = tiny_cfg(model={"temp_min": 0.01, "temp_max": 0.2})
    model = build_model("albef_tiny")
    with torch.no_grad():
        model.temp.fill_(start)
    temp = clamp_temperature(model, cfg)
    assert temp is model.temp and temp.item() == pytest.approx(expected)
    assert temp.requires_grad and temp.grad_fn is None  # clamped in place, outside the graph


def _momentum():
    torch.manual_seed(0)
    model = build_model("albef_tiny", text_dropout=0.0)
    return model, MomentumEncoder(model, 0.5, 8, index_queue=True)


@pytest.mark.parametrize("training, update, ema", [(True, True, True), (True, False, False), (False, True, False)])
def test_momentum_forward_runs_the_ema_only_in_training_when_asked(training, update, ema):
    model, mom = _momentum()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    before = [p.clone() for p in mom.model.parameters()]
    image, ids, att = make_batch(model.arch, b=2)
    momentum_forward(mom, model, image, ids, att, training=training, update_momentum=update)
    moved = any(not torch.equal(p, q) for p, q in zip(before, mom.model.parameters()))
    assert moved == ema and mom.ema_due == (not ema)


def test_momentum_forward_keys_come_from_the_momentum_encoders():
    model, mom = _momentum()
    image, ids, att = make_batch(model.arch, b=2)
    two_rows = torch.cat([ids, ids.flip(0)]), torch.cat([att, att.flip(0)])  # (2B, T): keys from the first B
    keys = momentum_forward(mom, model, image, *two_rows, training=False, update_momentum=False)
    m = mom.model
    with torch.no_grad():
        torch.testing.assert_close(keys.image_feat, m.image_features(m.encode_image(image)))
        torch.testing.assert_close(keys.text_feat, m.text_features(m.encode_text(ids, att)))
    assert keys.text_hidden.shape[0] == 4 and not keys.image_feat.requires_grad
    bare = momentum_forward(mom, model, image, training=False, update_momentum=False, features=False)
    assert bare.text_hidden is None and bare.image_feat is None and bare.text_feat is None
    assert bare.image_tokens.shape[0] == 2


def test_finish_queue_enqueues_keeps_or_skips():
    model, mom = _momentum()
    image, ids, att = make_batch(model.arch, b=2)
    keys = momentum_forward(mom, model, image, ids, att, training=False, update_momentum=False)
    finish_queue(mom, keys, training=False, enqueue=True)  # eval: nothing
    assert int(mom.queue_ptr) == 0 and not mom.pending
    finish_queue(mom, keys, torch.tensor([4, 5]), training=True, enqueue=False)  # kept for commit()
    assert int(mom.queue_ptr) == 0 and mom.pending[0][2].tolist() == [4, 5]
    finish_queue(mom, keys, training=True, enqueue=True)  # no image_idx: -1 in the index queue
    assert int(mom.queue_ptr) == 2 and mom.index_queue[:2].tolist() == [-1, -1]
    torch.testing.assert_close(mom.image_queue[:, :2], keys.image_feat.T)
    torch.testing.assert_close(mom.text_queue[:, :2], keys.text_feat.T)
    no_keys = momentum_forward(mom, model, image, training=False, update_momentum=False, features=False)
    finish_queue(mom, no_keys, training=True, enqueue=True)  # no ITC keys (MoD-MLM only): nothing
    finish_queue(None, None, training=True, enqueue=True)
    assert int(mom.queue_ptr) == 2 and len(mom.pending) == 1


def test_fuse_rows_is_one_pass_split_back_in_order():
    torch.manual_seed(0)
    model = build_model("albef_tiny", text_dropout=0.0).eval()
    image, ids, att = make_batch(model.arch, b=3)
    with torch.no_grad():
        image_tokens, text = model.encode_image(image), model.encode_text(ids, att)
        a = FusionRows(text, att, torch.tensor([2, 0, 1]))
        b = FusionRows(text[:2], att[:2], torch.tensor([1, 1]))
        fa, fb = fuse_rows(model, [a, b], image_tokens)
        torch.testing.assert_close(fa, model.fuse(a.text, a.mask, image_tokens, a.image_index))
        torch.testing.assert_close(fb, model.fuse(b.text, b.mask, image_tokens, b.image_index))
    assert fuse_rows(model, [], image_tokens) == []


def test_itm_step_is_rows_fuse_head_with_given_negatives():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model("albef_tiny", text_dropout=0.0).eval()
    image, ids, att = make_batch(model.arch, b=3)
    negatives = torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1])
    image_tokens, text = model.encode_image(image), model.encode_text(ids, att)
    out = itm_step(model, cfg, image_tokens, text, att, None, negatives=negatives, return_outputs=True)
    rows, extra = itm_rows(cfg, text, att, None, negatives=negatives, return_outputs=True)
    assert rows.text.shape[0] == 9 and rows.image_index.tolist() == [0, 1, 2, 1, 2, 0, 0, 1, 2]
    assert extra["neg_image"] is negatives[0] and extra["neg_text"] is negatives[1]
    by_hand = itm_head(model, model.fuse(*rows[:2], image_tokens, rows.image_index), 3, return_outputs=True)
    assert list(out) == ["neg_image", "neg_text", "itm_loss", "itm_acc", "itm_logits"]
    torch.testing.assert_close(out["itm_logits"], by_hand["itm_logits"])
    torch.testing.assert_close(out["itm_loss"], by_hand["itm_loss"])
    assert "itm_logits" not in itm_step(model, cfg, image_tokens, text, att, None, negatives=negatives)
