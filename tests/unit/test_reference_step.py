"""The whole pretraining step against the official one (tests/reference_albef.py).

``ReferencePretrainStep`` restates model_pretrain.py's ``ALBEF.forward``: temperature clamp,
EMA of the momentum encoders, ITC against batch + queue with MoD targets, enqueue, ITM on
hard negatives, MLM with MoD. From the same weights (loaded into our task through the
released-checkpoint loader), the same queues, masks and negatives, our ``train_step`` must
give the same losses (each objective and the sum), the same gradient for every trainable
parameter, and leave the same EMA weights and queues, in fp32 to ~1e-5 relative.
"""

import pytest
import torch

from albef_ray.model.adapters import albef_to_native, native_to_albef
from albef_ray.model.albef import build_model
from albef_ray.model.loading import load_albef_checkpoint
from albef_ray.objectives.mlm import SpecialTokens, mask_tokens
from albef_ray.objectives.pretrain import PretrainTask
from tests.conftest import make_batch, tiny_cfg
from tests.distributed_steps import one_step
from tests.reference_albef import ReferencePretrainStep, bert_scale_weights_

MOMENTUM = 0.9  # far from 1, so a missing or doubled EMA update is far outside the tolerance
QUEUE = 32
B, T = 8, 12
ALPHA = 0.4
ARCH = build_model("albef_tiny").arch


def _perturbed_reference(arch) -> ReferencePretrainStep:
    """Reference with BERT-scale weights, no LayerNorm at 1/0, momentum copies unlike online."""
    ref = ReferencePretrainStep(arch, queue_size=QUEUE, momentum=MOMENTUM, dropout=0.0)
    net = ref.net
    bert_scale_weights_(net)
    with torch.no_grad():
        for name, p in net.named_parameters():  # the copies start at online + noise
            if name.split(".")[0].endswith("_m"):
                p.add_(torch.randn_like(p) * 0.01)
        ref.queue_ptr.fill_(QUEUE - B)  # the write wraps to slot 0 next time: check the pointer
    return ref.train()


def _released_state(ref: ReferencePretrainStep) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in ref.net.state_dict().items()}
    for name in ("image_queue", "text_queue", "queue_ptr"):
        state[name] = getattr(ref, name).clone()
    return state


def _reference_grads(ref: ReferencePretrainStep, text_layers: int) -> dict[str, torch.Tensor]:
    """Gradients of the reference's parameters, renamed to our layout by the checkpoint adapter."""
    grads = {
        name: p.grad for name, p in ref.net.state_dict(keep_vars=True).items()
        if isinstance(p, torch.nn.Parameter) and p.grad is not None
    }
    native, unused = albef_to_native(grads, text_layers)
    assert not unused, unused
    return native


def _assert_close(ours, theirs, what, rtol=1e-5):
    """Relative to the tensor's scale: ``|a - b| <= rtol * max|b|`` (plus the elementwise rtol)."""
    scale = float(theirs.abs().max())
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol * scale + 1e-12, msg=lambda m: f"{what}: {m}")


def _setup(tmp_path, alpha):
    cfg = tiny_cfg(
        model={"text_dropout": 0.0},
        momentum={"momentum": MOMENTUM, "queue_size": QUEUE},
        mod={"alpha": alpha, "alpha_warmup_epochs": 0},
        train={"precision": "fp32", "batch_size": B},
    )
    ref = _perturbed_reference(ARCH)
    path = tmp_path / "start.pth"
    torch.save({"model": _released_state(ref)}, path)
    task = PretrainTask(build_model("albef_tiny", text_dropout=0.0), cfg)
    report = load_albef_checkpoint(task, str(path))
    assert not report.missing and not report.unused, str(report)
    return cfg, ref, task


def _step_both_and_compare(cfg, ref, task, alpha, seed):
    """One step of each from the same state and inputs; every comparison of the module docstring."""
    before = {k: v.clone() for k, v in task.state_dict().items()}
    ptr = int(before["momentum.queue_ptr"])
    image, ids, att = make_batch(ARCH, b=B, t=T, seed=seed)
    masked, labels = mask_tokens(ids, ARCH.vocab_size, SpecialTokens(), 0.3, generator=torch.Generator().manual_seed(seed))
    assert (labels != -100).sum() >= B
    # Negatives as the hard sampler could draw them: never the positive, some rows sharing one.
    neg_image = torch.tensor([1, 0, 3, 2, 5, 4, 0, 6]).roll(seed)
    neg_text = torch.tensor([7, 2, 1, 1, 6, 7, 5, 0]).roll(seed)
    assert not (neg_image == torch.arange(B)).any() and not (neg_text == torch.arange(B)).any()

    ref.zero_grad(set_to_none=True)
    theirs = ref(image, ids, att, alpha=alpha, mlm_input=(masked, labels), itm_negatives=(neg_image, neg_text))
    theirs["loss"].backward()
    micro = [{
        "image": image, "input_ids": ids, "attention_mask": att,
        "mlm_input": (masked, labels), "itm_negatives": (neg_image, neg_text),
    }]
    ours = one_step(task, cfg, micro)
    assert ours["metrics"]["alpha"] == alpha and not ours["metrics"]["skipped"]

    # Losses: each objective and the sum.
    for key in ("itc_loss", "itm_loss", "mlm_loss", "loss"):
        assert ours["metrics"][key] == pytest.approx(float(theirs[key].detach()), rel=1e-5), key

    # Gradients of every trainable parameter, and no parameter on only one side.
    ref_grads = _reference_grads(ref, ARCH.text_layers)
    trainable = {f"model.{n}" for n, p in task.model.named_parameters() if p.requires_grad}
    assert set(ours["grads"]) == trainable
    assert set(ref_grads) == trainable
    for name in sorted(trainable):
        _assert_close(ours["grads"][name], ref_grads[name], f"grad {name}")

    # EMA weights after the step: one update, p_m <- m p_m + (1 - m) p of the pre-step weights.
    ref_momentum, _ = albef_to_native(
        {k: v for k, v in ref.net.state_dict().items() if k.split(".")[0].endswith("_m")}, ARCH.text_layers
    )
    assert set(ref_momentum) == {k for k in ours["state"] if k.startswith("momentum.model.")}
    for name, value in ref_momentum.items():
        assert not torch.equal(value, before[name]), f"{name}: the reference's EMA did not move"
        _assert_close(ours["state"][name], value, f"EMA {name}")

    # Queues after the step: the batch's momentum features written at the old pointer, wrapping.
    assert int(ours["state"]["momentum.queue_ptr"]) == int(ref.queue_ptr) == (ptr + B) % QUEUE
    kept = torch.ones(QUEUE, dtype=torch.bool)
    kept[ptr:ptr + B] = False
    for name in ("image_queue", "text_queue"):
        _assert_close(ours["state"][f"momentum.{name}"], getattr(ref, name), name)
        assert torch.equal(ours["state"][f"momentum.{name}"][:, kept], before[f"momentum.{name}"][:, kept])


@pytest.mark.parametrize("alpha", [0.4, 0.0])
def test_pretrain_step_matches_reference(tmp_path, alpha):
    cfg, ref, task = _setup(tmp_path, alpha)
    _step_both_and_compare(cfg, ref, task, alpha, seed=3)


def test_second_step_matches_reference(tmp_path):
    """Step 2 runs the EMA again, with the weights step 1 left (the official order: the EMA at the
    start of each step's forward), and writes the queue after step 1's keys. Our AdamW (no decay
    on temp, cls_token, pos_embed) is not the official one, so the reference continues from our
    weights after step 1; its EMA and queue are its own."""
    cfg, ref, task = _setup(tmp_path, ALPHA)
    _step_both_and_compare(cfg, ref, task, ALPHA, seed=3)
    online = native_to_albef({k: v for k, v in task.state_dict().items() if k.startswith("model.")}, ARCH.text_layers)
    result = ref.net.load_state_dict(online, strict=False)
    assert not result.unexpected_keys
    assert all(k.split(".")[0].endswith("_m") for k in result.missing_keys), result.missing_keys
    _step_both_and_compare(cfg, ref, task, ALPHA, seed=4)
    assert int(task.momentum.queue_ptr) == B  # step 1 wrapped to slot 0, step 2 wrote 0..B-1
