"""NLVR2: the two-image fusion against a by-hand computation, heads, losses, the text-assignment
draws, and the official checkpoint layouts (nlvr.pth, the TA checkpoint, a pretrained ALBEF)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from albef_ray.config import build_config
from albef_ray.model.adapters import native_to_albef
from albef_ray.model.albef import build_model
from albef_ray.model.loading import load_albef_checkpoint
from albef_ray.model.nlvr import PairFusionEncoder
from albef_ray.model.registry import get_arch
from albef_ray.model.text import FusionEncoder
from albef_ray.objectives.blocks import distilled_cross_entropy
from albef_ray.objectives.nlvr import NLVRTask, TextAssignmentTask, assign_images
from albef_ray.objectives.pretrain import PretrainTask
from tests.conftest import ALL_SIZES, make_batch


def _cfg(task: str, size: str = "albef_tiny", **nlvr) -> object:
    return build_config({
        "task": task, "model": {"size": size, "vit_init": None, "bert_init": None},
        "momentum": {"queue_size": 32}, "train": {"batch_size": 4, "num_workers": 1}, "nlvr": nlvr,
    })


# ------------------------------------------------------------------- the fusion, by hand

def _attend(q, k, v, heads, mask=None):
    """softmax(q k^T / sqrt(d) [+ -inf on padding]) v, head by head, written out."""
    b, t, c = q.shape
    d = c // heads
    split = lambda x: x.view(x.shape[0], x.shape[1], heads, d).transpose(1, 2)
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d)  # (B, h, T, L)
    if mask is not None:
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    return (scores.softmax(dim=-1) @ split(v)).transpose(1, 2).reshape(b, t, c)


def _layer_by_hand(layer, x, mask, image, heads):
    sa, ca, ffn = layer.self_attn, layer.cross_attn, layer.ffn
    c = x.shape[-1]
    w, bias = sa.qkv.weight, sa.qkv.bias
    q, k, v = (x @ w[i * c:(i + 1) * c].T + bias[i * c:(i + 1) * c] for i in range(3))
    x = F.layer_norm(x + F.linear(_attend(q, k, v, heads, mask), sa.out.weight, sa.out.bias), (c,),
                     sa.norm.weight, sa.norm.bias, sa.norm.eps)
    q = F.linear(x, ca.q.weight, ca.q.bias)
    k = image @ ca.kv.weight[:c].T + ca.kv.bias[:c]
    v = image @ ca.kv.weight[c:].T + ca.kv.bias[c:]
    x = F.layer_norm(x + F.linear(_attend(q, k, v, heads), ca.out.weight, ca.out.bias), (c,),
                     ca.norm.weight, ca.norm.bias, ca.norm.eps)
    h = F.linear(x, ffn.fc1.weight, ffn.fc1.bias)
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # BERT's exact GELU
    return F.layer_norm(x + F.linear(h, ffn.fc2.weight, ffn.fc2.bias), (c,), ffn.norm.weight, ffn.norm.bias,
                        ffn.norm.eps)


@pytest.mark.parametrize("size", ALL_SIZES)
def test_two_image_fusion_equals_the_two_cross_attentions_by_hand(size):
    arch = get_arch(size)
    single = FusionEncoder(arch, dropout=0.0)
    for p in single.parameters():  # away from the 0/1 initialisation, so every weight matters
        torch.nn.init.normal_(p, std=0.05)
    pair = PairFusionEncoder.from_fusion(single).eval()
    g = torch.Generator().manual_seed(0)
    text = torch.randn(2, 5, arch.text_width, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    img1, img2 = (torch.randn(2, 7, arch.vision_width, generator=g) for _ in range(2))
    for p in pair.parameters():  # pairs start equal; give each copy its own values (tied K/V stay one)
        p.data.add_(0.02 * torch.randn(p.shape, generator=g))

    with torch.no_grad():
        got = pair(text, mask, (img1, img2))
        x = text
        for i, layer in enumerate(pair.layers):  # layer 2i attends to image 1, 2i+1 to image 2
            x = _layer_by_hand(layer, x, mask, img1 if i % 2 == 0 else img2, arch.text_heads)
        torch.testing.assert_close(got, x, atol=2e-5, rtol=1e-4)
        # Indexed images (text assignment): rows of one bank, gathered per text.
        bank = torch.cat([img1, img2])
        indexed = pair(text, mask, (bank, bank), (torch.tensor([0, 1]), torch.tensor([2, 3])))
        torch.testing.assert_close(indexed, got, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(pair(text, mask, (img2, img1)), got)  # the order of the images matters


def test_from_fusion_doubles_each_layer_and_ties_key_value():
    arch = build_model("albef_tiny").arch
    single = FusionEncoder(arch)
    pair = PairFusionEncoder.from_fusion(single)
    assert len(pair.layers) == 2 * arch.fusion_layers
    for i, layer in enumerate(single.layers):
        for copy_ in (pair.layers[2 * i], pair.layers[2 * i + 1]):
            for (name, p), q in zip(copy_.named_parameters(), layer.parameters()):
                assert torch.equal(p, q) and p is not q, name
        first, second = pair.layers[2 * i], pair.layers[2 * i + 1]
        assert first.cross_attn.kv is second.cross_attn.kv  # one module: tied K/V
        assert first.cross_attn.q is not second.cross_attn.q and first.ffn is not second.ffn
    names = dict(pair.named_parameters())
    assert "layers.1.cross_attn.kv.weight" not in names  # counted once (the optimizer steps it once)
    assert "layers.1.cross_attn.kv.weight" in pair.state_dict()  # saved under both names, as the official


def test_single_image_state_dict_loads_into_the_doubled_layers():
    arch = build_model("albef_tiny").arch
    single = FusionEncoder(arch)
    pair = PairFusionEncoder(arch)
    result = pair.load_state_dict(single.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    for i, layer in enumerate(single.layers):
        assert torch.equal(pair.layers[2 * i].ffn.fc1.weight, layer.ffn.fc1.weight)
        assert torch.equal(pair.layers[2 * i + 1].self_attn.qkv.bias, layer.self_attn.qkv.bias)
        assert torch.equal(pair.layers[2 * i + 1].cross_attn.kv.weight, layer.cross_attn.kv.weight)


# ------------------------------------------------------------------------ heads, losses

@pytest.mark.parametrize("size", ALL_SIZES)
def test_heads_give_two_and_three_way_logits(size):
    cfg = _cfg("nlvr", size, distill=False)
    albef = build_model(size, image_res=32)
    ta = TextAssignmentTask(copy.deepcopy(albef), _cfg("nlvr_pretrain", size)).eval()  # a copy: faster than a build
    task = NLVRTask(albef, cfg).eval()
    image, ids, att = make_batch(task.model.arch, b=2, t=6)
    with torch.no_grad():
        assert task.logits(image, ids, att, image.flip(0)).shape == (2, 2)
    assert len(task.model.fusion.layers) == 2 * task.model.arch.fusion_layers
    assert not any(hasattr(task.model, p) for p in ("itm_head", "mlm_head", "vision_proj", "temp"))
    with torch.no_grad():
        out = ta(image, ids, att, assignment=(torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([0, 2])))
    assert ta.ta_head.out_features == 3 and torch.isfinite(out["loss"])


def test_distilled_loss_matches_hand_computed_values():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0, 0])
    m = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    ce = [math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(1.0))]  # -log p(target)
    logp = [[-math.log(1 + math.exp(-2.0)), -math.log(1 + math.exp(2.0))],
            [-math.log(1 + math.exp(1.0)), -math.log(1 + math.exp(-1.0))]]
    q = [[0.5, 0.5], [1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(1.0))]]
    soft = -sum(q[i][k] * logp[i][k] for i in range(2) for k in range(2)) / 2
    assert distilled_cross_entropy(logits, targets).item() == pytest.approx(sum(ce) / 2, rel=1e-6)
    assert distilled_cross_entropy(logits, targets, m, 0.4).item() == pytest.approx(
        0.6 * sum(ce) / 2 + 0.4 * soft, rel=1e-6)


def test_forward_loss_accuracy_and_momentum_of_encoders_and_head():
    cfg = _cfg("nlvr")
    task = NLVRTask(build_model("albef_tiny"), cfg)
    image, ids, att = make_batch(task.model.arch, b=4)
    label = torch.tensor([1, 0, 1, 0])
    task.eval()
    with torch.no_grad():
        logits = task.logits(image, ids, att, image.flip(0))
        out = task(image, ids, att, alpha=0.4, image2=image.flip(0), label=label)
    assert out["nlvr_loss"].item() == pytest.approx(F.cross_entropy(logits, label).item(), rel=1e-5)  # eval: no MoD
    assert out["nlvr_batch_acc"].item() == (logits.argmax(1) == label).float().mean().item()

    with torch.no_grad():
        task.head[2].weight.add_(1.0)
        task.model.fusion.layers[3].ffn.fc1.bias.add_(1.0)
    before = task.momentum_head[2].weight.clone(), task.momentum.model.fusion.layers[3].ffn.fc1.bias.clone()
    task.train()
    out = task(image, ids, att, alpha=0.4, image2=image.flip(0), label=label)
    m = cfg.momentum.momentum
    torch.testing.assert_close(task.momentum_head[2].weight, m * before[0] + (1 - m) * task.head[2].weight)
    torch.testing.assert_close(task.momentum.model.fusion.layers[3].ffn.fc1.bias,
                               m * before[1] + (1 - m) * task.model.fusion.layers[3].ffn.fc1.bias)
    out["loss"].backward()
    assert all(p.grad is not None for p in task.parameters() if p.requires_grad)
    assert NLVRTask.batch_keys == ("image2", "label")


# ------------------------------------------------------------------------- text assignment

def test_assignment_labels_say_where_each_captions_image_is():
    b = 48
    sim = torch.randn(b, b)
    first, second, label = assign_images(sim, torch.Generator().manual_seed(0))
    rows = torch.arange(b)
    assert ((label == 0) == (first == rows)).all() and ((label == 1) == (second == rows)).all()
    assert (first != second).all()
    neither = label == 2
    assert ((first[neither] != rows[neither]) & (second[neither] != rows[neither])).all()
    counts = torch.stack([assign_images(sim, torch.Generator().manual_seed(s))[2] for s in range(30)]).flatten()
    assert [round(float((counts == k).float().mean()), 1) for k in range(3)] == [0.3, 0.3, 0.3]


def test_assignment_draws_by_similarity_and_never_the_same_image():
    sim = torch.full((4, 4), -30.0)
    sim[0, 3] = sim[3, 0] = sim[1, 2] = sim[2, 1] = 30.0  # each row's favourite other image
    first, second, label = assign_images(sim, torch.Generator().manual_seed(1))
    favourite = torch.tensor([3, 2, 1, 0])
    match = label < 2
    other = torch.where(label == 0, second, first)
    assert (other[match] == favourite[match]).all()
    image_idx = torch.tensor([5, 5, 6, 7])  # rows 0 and 1 show one image
    for seed in range(20):
        first, second, label = assign_images(torch.zeros(4, 4), torch.Generator().manual_seed(seed), image_idx)
        shown = torch.stack([first, second], 1)
        assert not ((image_idx[shown] == image_idx[:, None]).sum(1) > (label < 2).long()).any()
    with pytest.raises(ValueError, match="at least 2"):
        assign_images(torch.zeros(1, 1))
    _, _, label = assign_images(torch.zeros(2, 2), torch.Generator().manual_seed(0))
    assert (label < 2).all()  # a single other image: never "neither"


# ----------------------------------------------------------- official checkpoint layouts

def _official(task, text_layers: int) -> dict[str, torch.Tensor]:
    """An official NLVR2 / TA state dict: 18-layer bare BertModel text encoders, heads by their names."""
    state = native_to_albef(task.state_dict(), text_layers, finetuned=True)
    state["text_encoder.embeddings.position_ids"] = torch.arange(task.model.arch.max_position)[None]
    for key, value in task.state_dict().items():
        for native, official in (("head.", "cls_head."), ("momentum_head.", "cls_head_m."), ("ta_head.", "ta_head.")):
            if key.startswith(native):
                state[official + key[len(native):]] = value
    return state


def test_official_nlvr_checkpoint_loads_with_no_missing_or_unused_key(tmp_path):
    torch.manual_seed(0)
    source = NLVRTask(build_model("albef_tiny"), _cfg("nlvr"))
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.05)
    t = source.model.arch.text_layers
    official = _official(source, t)
    last = t + 2 * source.model.arch.fusion_layers - 1
    assert f"text_encoder.encoder.layer.{last}.crossattention.self.key.weight" in official  # 18 layers for base
    assert torch.equal(official[f"text_encoder.encoder.layer.{last}.crossattention.self.key.weight"],
                       official[f"text_encoder.encoder.layer.{last - 1}.crossattention.self.key.weight"])
    assert {"cls_head.0.weight", "cls_head_m.2.bias", "visual_encoder_m.pos_embed"} <= official.keys()
    torch.save({"model": official}, tmp_path / "nlvr.pth")

    target = NLVRTask(build_model("albef_tiny"), _cfg("nlvr"))
    report = load_albef_checkpoint(target, str(tmp_path / "nlvr.pth"))
    assert report.missing == [] and report.unused == [], str(report)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    assert target.model.fusion.layers[0].cross_attn.kv is target.model.fusion.layers[1].cross_attn.kv

    plain = NLVRTask(build_model("albef_tiny"), _cfg("nlvr", distill=False))  # distill off: *_m unused, named
    report = load_albef_checkpoint(plain, str(tmp_path / "nlvr.pth"))
    assert report.missing == [] and report.unused
    assert all(k.startswith(("momentum.", "momentum_head.")) for k in report.unused), report.unused


def test_official_text_assignment_checkpoint_loads_with_no_missing_or_unused_key(tmp_path):
    source = TextAssignmentTask(build_model("albef_tiny"), _cfg("nlvr_pretrain"))
    official = _official(source, source.model.arch.text_layers)
    assert {"vision_proj.weight", "text_proj.bias", "temp", "ta_head.weight"} <= official.keys()
    torch.save({"model": official}, tmp_path / "ta.pth")
    target = TextAssignmentTask(build_model("albef_tiny"), _cfg("nlvr_pretrain"))
    report = load_albef_checkpoint(target, str(tmp_path / "ta.pth"))
    assert report.missing == [] and report.unused == [], str(report)
    assert torch.equal(target.ta_head.weight, source.ta_head.weight)
    assert torch.equal(target.model.fusion.layers[3].ffn.fc2.weight, source.model.fusion.layers[3].ffn.fc2.weight)

    # ... and its albef-ray checkpoint starts NLVR2: only the TA-only parts are left over.
    torch.save(source.state_dict(), tmp_path / "ta_state.pt")
    nlvr = NLVRTask(build_model("albef_tiny"), _cfg("nlvr"))
    report = load_albef_checkpoint(nlvr, str(tmp_path / "ta_state.pt"))
    assert report.missing == []
    assert sorted(report.unused) == sorted(["model.vision_proj.weight", "model.vision_proj.bias", "model.temp",
                                            "model.text_proj.weight", "model.text_proj.bias",
                                            "ta_head.weight", "ta_head.bias"])
    assert torch.equal(nlvr.momentum.model.fusion.layers[2].ffn.fc1.weight, source.model.fusion.layers[2].ffn.fc1.weight)


@pytest.mark.parametrize("layout", ["official", "albef-ray"])
def test_pretrained_albef_initialises_the_doubled_layers(tmp_path, layout):
    pretrained = PretrainTask(build_model("albef_tiny"), _cfg("pretrain"))
    with torch.no_grad():
        for p in pretrained.parameters():
            p.normal_(0, 0.05)
    t = pretrained.model.arch.text_layers
    state = native_to_albef(pretrained.state_dict(), t) if layout == "official" else pretrained.state_dict()
    torch.save({"model": state}, tmp_path / "pretrained.pth")

    nlvr = NLVRTask(build_model("albef_tiny"), _cfg("nlvr"))
    report = load_albef_checkpoint(nlvr, str(tmp_path / "pretrained.pth"))
    assert report.missing == [], str(report)
    pretraining_only = ("itm_head", "vision_proj", "text_proj", "temp", "text_encoder.cls", "text_encoder_m.cls",
                        "mlm_head", "image_queue", "text_queue", "queue_ptr", "idx_queue", "index_queue")
    assert report.unused and all(any(p in k for p in pretraining_only) for k in report.unused), report.unused
    for i, layer in enumerate(pretrained.model.fusion.layers):
        for j in (2 * i, 2 * i + 1):
            for (name, p), q in zip(nlvr.model.fusion.layers[j].named_parameters(), layer.parameters()):
                assert torch.equal(p, q), (j, name)
            m_layer = pretrained.momentum.model.fusion.layers[i]
            assert torch.equal(nlvr.momentum.model.fusion.layers[j].ffn.fc1.weight, m_layer.ffn.fc1.weight)
    assert torch.equal(nlvr.momentum_head[0].weight, nlvr.head[0].weight)  # fresh head, its copy

    ta = TextAssignmentTask(build_model("albef_tiny"), _cfg("nlvr_pretrain"))
    report = load_albef_checkpoint(ta, str(tmp_path / "pretrained.pth"))
    assert report.missing == [], str(report)
    assert torch.equal(ta.model.fusion.layers[1].cross_attn.kv.weight, pretrained.model.fusion.layers[0].cross_attn.kv.weight)
    assert torch.equal(ta.model.vision_proj.weight, pretrained.model.vision_proj.weight)
