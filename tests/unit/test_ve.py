"""SNLI-VE task: head shapes, loss and distillation by hand, EMA, official ve.pth layout, accuracy."""

from __future__ import annotations

import math

import pytest
import torch

from albef_ray.config import ConfigError, build_config
from albef_ray.eval.ve import ve_accuracy
from albef_ray.model.adapters import native_to_albef
from albef_ray.model.albef import build_model
from albef_ray.model.loading import load_albef_checkpoint
from albef_ray.objectives.blocks import distilled_cross_entropy as ve_loss
from albef_ray.objectives.ve import UNUSED_PARTS, VETask
from albef_ray.tasks import build_task, get_task
from tests.conftest import ALL_SIZES, make_batch, tiny_cfg

QUEUE_BUFFERS = {"momentum.image_queue", "momentum.text_queue", "momentum.queue_ptr"}  # a VE model has no queue


def ve_cfg(distill: bool = True, **sections):
    return tiny_cfg(ve={"distill": distill}, **sections).model_copy(update={"task": "ve"})


def perturbed(task: VETask, seed: int = 0) -> VETask:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in task.state_dict().values():
            if p.is_floating_point():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return task


@pytest.mark.parametrize("size", ALL_SIZES)
def test_head_gives_three_logits_on_every_size(size):
    task = VETask(build_model(size), ve_cfg(distill=False)).eval()
    arch = task.model.arch
    image, ids, att = make_batch(arch, b=2, t=6)
    with torch.no_grad():
        logits = task.logits(image, ids, att)
        out = task(image, ids, att, label=torch.tensor([0, 2]))
    assert logits.shape == (2, 3) and logits.dtype == torch.float32
    assert [m.in_features for m in task.head if hasattr(m, "in_features")] == [arch.text_width, arch.text_width]
    assert math.isfinite(float(out["loss"])) and set(out) == {"loss", "ve_loss", "ve_batch_acc"}
    names = {k.split(".")[1] for k in task.state_dict() if k.startswith("model.")}
    assert names == {"vision", "text", "fusion"} and not set(UNUSED_PARTS) & names


def test_loss_and_distillation_match_hand_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    momentum = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    label = torch.tensor([0, 2])

    def log_softmax(row):
        z = math.log(sum(math.exp(x) for x in row))
        return [x - z for x in row]

    ce = -(log_softmax([2.0, 0.0, -1.0])[0] + log_softmax([0.5, 0.5, 0.0])[2]) / 2
    soft = 0.0
    for p, m in zip(logits.tolist(), momentum.tolist()):
        q = [math.exp(x) for x in log_softmax(m)]
        soft -= sum(qi * li for qi, li in zip(q, log_softmax(p))) / 2
    assert float(ve_loss(logits, label)) == pytest.approx(ce, abs=1e-6)
    assert float(ve_loss(logits, label, momentum, alpha=0.4)) == pytest.approx(0.6 * ce + 0.4 * soft, abs=1e-6)
    assert float(ve_loss(logits, label, momentum, alpha=0.0)) == pytest.approx(ce, abs=1e-6)


def test_training_forward_distills_from_the_momentum_model_after_its_ema():
    torch.manual_seed(0)
    task = perturbed(VETask(build_model("albef_tiny"), ve_cfg())).train()
    for module in task.modules():  # no dropout: the hand computation below sees the same network
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "dropout", None), float):  # attention-probability dropout
            module.dropout = 0.0
    image, ids, att = make_batch(task.model.arch, b=3, t=6)
    label = torch.tensor([0, 1, 2])
    head0 = [p.clone() for p in task.momentum_head.parameters()]
    vit0 = task.momentum.model.vision.vit.pos_embed.clone()
    out = task(image, ids, att, alpha=0.4, label=label, return_outputs=True)

    m = task.cfg.momentum.momentum
    for before, after, online in zip(head0, task.momentum_head.parameters(), task.head.parameters()):
        torch.testing.assert_close(after, m * before + (1 - m) * online)
    torch.testing.assert_close(task.momentum.model.vision.vit.pos_embed, m * vit0 + (1 - m) * task.model.vision.vit.pos_embed)
    with torch.no_grad():  # the momentum model's logits, computed from its parts after the EMA
        mm = task.momentum.model
        fused = mm.fuse(mm.encode_text(ids, att), att, mm.encode_image(image))
        expected_m = task.momentum_head(fused[:, 0])
    torch.testing.assert_close(out["momentum_logits"], expected_m)
    torch.testing.assert_close(out["loss"], ve_loss(out["logits"], label, expected_m, 0.4))
    out["loss"].backward()
    trainable = [n for n, p in task.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for p in task.parameters() if p.requires_grad), "every trainable weight is used"
    assert not any(n.startswith(("momentum.", "momentum_head.")) for n in trainable)

    # eval mode: no EMA, no momentum pass, plain cross-entropy
    task.eval()
    before = [p.clone() for p in task.momentum_head.parameters()]
    out = task(image, ids, att, alpha=0.4, label=label, return_outputs=True)
    assert "momentum_logits" not in out
    assert all(torch.equal(a, b) for a, b in zip(before, task.momentum_head.parameters()))
    torch.testing.assert_close(out["loss"], ve_loss(out["logits"], label))


def test_forward_needs_labels_and_the_registry_knows_the_task():
    task = VETask(build_model("albef_tiny"), ve_cfg(distill=False))
    image, ids, att = make_batch(task.model.arch, b=2, t=5)
    with pytest.raises(ValueError, match="label"):
        task(image, ids, att)
    spec = get_task("ve")
    assert spec.task_class() is VETask and spec.score == "ve_acc" and VETask.batch_keys == ("label",)
    assert isinstance(build_task(ve_cfg()), VETask)
    with pytest.raises(ConfigError, match="ve.distill"):
        build_config({"ve": {"distill": "maybe"}})


def official_ve_state(task: VETask, distill: bool = True) -> dict[str, torch.Tensor]:
    """The released ve.pth layout: visual_encoder.*, text_encoder.* (a BertModel with the
    fusion layers), cls_head.*, and with distill the *_m copies; no projections or queues."""
    native = {k: v for k, v in task.state_dict().items() if k.startswith(("model.", "momentum.model."))}
    official = native_to_albef(native, task.model.arch.text_layers, finetuned=True)
    official = {k: v for k, v in official.items() if distill or "_m." not in k}
    official["text_encoder.embeddings.position_ids"] = torch.arange(64)[None]  # HF BertModel's buffer
    for i in (0, 2):
        for p in ("weight", "bias"):
            official[f"cls_head.{i}.{p}"] = getattr(task.head[i], p).detach().clone()
            if distill:
                official[f"cls_head_m.{i}.{p}"] = getattr(task.momentum_head[i], p).detach().clone()
    return official


def test_official_ve_checkpoint_loads_with_no_unexplained_keys(tmp_path):
    src = perturbed(VETask(build_model("albef_tiny"), ve_cfg()))
    official = official_ve_state(src)
    assert {k.split(".")[0] for k in official} == {
        "visual_encoder", "text_encoder", "cls_head", "visual_encoder_m", "text_encoder_m", "cls_head_m"}
    torch.save({"model": official, "config": {}}, tmp_path / "ve.pth")

    dst = VETask(build_model("albef_tiny"), ve_cfg())
    report = load_albef_checkpoint(dst, str(tmp_path / "ve.pth"))
    assert not report.unused, str(report)
    assert set(report.missing) <= QUEUE_BUFFERS, str(report)
    for key, value in src.state_dict().items():
        if key not in QUEUE_BUFFERS:
            assert torch.equal(dst.state_dict()[key], value), key


def test_official_ve_checkpoint_without_momentum_copies_the_online_weights(tmp_path):
    src = perturbed(VETask(build_model("albef_tiny"), ve_cfg()))
    torch.save({"model": official_ve_state(src, distill=False)}, tmp_path / "ve.pth")
    dst = VETask(build_model("albef_tiny"), ve_cfg())
    report = load_albef_checkpoint(dst, str(tmp_path / "ve.pth"))
    assert not report.unused and set(report.missing) <= QUEUE_BUFFERS, str(report)
    for online, copy in zip(dst.head.parameters(), dst.momentum_head.parameters()):
        assert torch.equal(online, copy)
    assert torch.equal(dst.momentum.model.fusion.layers[0].cross_attn.q.weight, src.model.fusion.layers[0].cross_attn.q.weight)

    # and a distilled release into a task without distillation: the *_m keys are reported unused
    torch.save({"model": official_ve_state(src)}, tmp_path / "ve_m.pth")
    plain = VETask(build_model("albef_tiny"), ve_cfg(distill=False))
    report = load_albef_checkpoint(plain, str(tmp_path / "ve_m.pth"))
    assert not report.missing and report.unused
    assert all(k.startswith(("momentum.", "momentum_head.")) for k in report.unused), str(report)


def test_pretraining_checkpoint_starts_the_task_and_the_head_stays_fresh(tmp_path):
    from albef_ray.objectives.pretrain import PretrainTask

    pre = PretrainTask(build_model("albef_tiny"), tiny_cfg())
    torch.save({"model": pre.state_dict()}, tmp_path / "state.pt")
    task = build_task(ve_cfg(model={"checkpoint": str(tmp_path / "state.pt")}))
    assert torch.equal(task.model.fusion.layers[1].ffn.fc1.weight, pre.model.fusion.layers[1].ffn.fc1.weight)
    assert torch.equal(task.momentum.model.text.embeddings.word.weight, pre.momentum.model.text.embeddings.word.weight)
    for online, copy in zip(task.head.parameters(), task.momentum_head.parameters()):
        assert torch.equal(online, copy)  # the official copy_params() at construction


class FixedLogits(torch.nn.Module):
    """A stand-in task whose prediction for row i is ``preds[i]``."""

    def __init__(self, preds):
        super().__init__()
        self.preds = torch.tensor(preds)
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = 0

    def logits(self, image, ids, mask):
        rows = self.preds[self.seen : self.seen + image.shape[0]]
        self.seen += image.shape[0]
        return torch.nn.functional.one_hot(rows, 3).float()


def test_accuracy_overall_and_per_class_by_hand():
    labels = [0, 0, 1, 1, 1, 2, 2, 2, 2]
    preds = [0, 1, 1, 1, 0, 2, 2, 0, 2]
    batches = [
        {"image": torch.zeros(len(lab), 3, 2, 2), "input_ids": torch.zeros(len(lab), 2, dtype=torch.long),
         "attention_mask": torch.ones(len(lab), 2, dtype=torch.long), "label": torch.tensor(lab),
         "num_dropped": torch.tensor(n)}
        for lab, n in ((labels[:4], 1), (labels[4:], 0))
    ]
    task = FixedLogits(preds).train()
    metrics = ve_accuracy(task, batches)
    assert metrics["ve_acc"] == pytest.approx(100 * 6 / 9)
    assert metrics["ve_acc_contradiction"] == pytest.approx(50.0)
    assert metrics["ve_acc_neutral"] == pytest.approx(100 * 2 / 3)
    assert metrics["ve_acc_entailment"] == pytest.approx(75.0)
    assert (metrics["num_examples"], metrics["skipped_examples"]) == (9, 1)
    assert task.training  # mode restored
