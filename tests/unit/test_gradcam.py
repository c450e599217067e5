"""Grad-CAM on attention maps: the map's formula, the explicit-attention capture, forced attention, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from albef_ray.eval.attention import capture_cross_attention, capture_image_attention
from albef_ray.eval.gradcam import attention_gradcam, default_layer, itc_gradcam, itm_gradcam, word_maps
from albef_ray.model.albef import build_model
from tests.conftest import make_batch


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("albef_tiny_64").eval()  # 8 x 8 patch grid, 2 fusion layers


def test_gradcam_of_a_hand_built_pair_is_the_positive_gradient_times_attention_head_mean():
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(2, 3, 4, 1 + 9, generator=g)  # (B, h, Q, 1 + N), N = 3 x 3
    grad = torch.randn(2, 3, 4, 1 + 9, generator=g)
    cam = attention_gradcam(attn, grad)
    assert cam.shape == (2, 4, 3, 3)
    for b in range(2):
        for q in range(4):
            for n in range(9):
                expected = sum(attn[b, h, q, 1 + n] * max(grad[b, h, q, 1 + n].item(), 0.0) for h in range(3)) / 3
                assert cam[b, q, n // 3, n % 3].item() == pytest.approx(expected.item(), abs=1e-7)
    with pytest.raises(ValueError, match="square"):
        attention_gradcam(attn[..., :9], grad[..., :9])


@pytest.mark.parametrize("layer", [0, 1, -1])
def test_explicit_cross_attention_equals_the_sdpa_path(model, layer):
    image, ids, att = make_batch(model.arch, b=3, seed=1)
    index = torch.tensor([1, 0, 1])  # shared images through context_index, as ITM and retrieval do
    with torch.no_grad():
        tokens, hidden = model.encode_image(image[:2]), model.encode_text(ids, att)
        expected = model.fuse(hidden, att, tokens, index)
        with capture_cross_attention(model, layer) as record:
            got = model.fuse(hidden, att, tokens, index)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert record.calls == 1 and record.attn.shape == (3, model.arch.text_heads, ids.shape[1], 1 + model.arch.num_patches)
    torch.testing.assert_close(record.attn.sum(-1), torch.ones(record.attn.shape[:-1]))
    assert all("forward" not in vars(layer.cross_attn) for layer in model.fusion.layers)  # restored


@pytest.mark.parametrize("layer", [0, -1])
def test_explicit_vit_attention_equals_the_sdpa_path(model, layer):
    image, _, _ = make_batch(model.arch, b=2, seed=2)
    with torch.no_grad():
        expected = model.encode_image(image)
        with capture_image_attention(model, layer) as record:
            got = model.encode_image(image)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    n = 1 + model.arch.num_patches
    assert record.attn.shape == (2, model.arch.vision_heads, n, n)
    assert all("forward" not in vars(block.attn) for block in model.vision.vit.blocks)


def test_retained_gradient_equals_autograd_and_a_frozen_model_still_has_one(model):
    image, ids, att = make_batch(model.arch, b=2, seed=3)
    with capture_cross_attention(model, 0) as record:
        logit = model.itm_logits(model.fuse(model.encode_text(ids, att), att, model.encode_image(image)))[:, 1].sum()
        (grad,) = torch.autograd.grad(logit, record.attn, retain_graph=True)
        record.attn.grad = None  # autograd.grad fills a retained .grad as well
        logit.backward()
    torch.testing.assert_close(record.attn.grad, grad)
    model.zero_grad(set_to_none=True)
    frozen = build_model("albef_tiny").eval().requires_grad_(False)
    image, ids, att = make_batch(frozen.arch, b=2, seed=3)
    cam = itm_gradcam(frozen, image, ids, att, layer=0)
    assert cam.tokens.abs().sum() > 0 and all(p.grad is None for p in frozen.parameters())


def test_out_of_range_layer_is_named(model):
    with pytest.raises(ValueError, match="fusion encoder has 2 layers"):
        with capture_cross_attention(model, 2):
            pass


def _force_onto(q_proj, k_proj, key_offset: int, token: int, width: int, alpha: float = 1e3):
    """Hooks: every query = b, and token ``token``'s key += alpha * b, so softmax puts ~all mass on it.

    ``q_proj`` yields the queries in its first ``width`` features (a q or a fused qkv Linear),
    ``k_proj`` the keys at ``key_offset`` (a kv or the same qkv Linear).
    """
    b = torch.full((width,), 0.5)

    def constant_query(module, inputs, out):
        return torch.cat([b.expand_as(out[..., :width]), out[..., width:]], dim=-1)

    def boosted_key(module, inputs, out):
        out = out.clone()
        out[:, token, key_offset:key_offset + width] += alpha * b
        return out

    return [q_proj.register_forward_hook(constant_query), k_proj.register_forward_hook(boosted_key)]


def _negate_score(model, variant: str) -> None:
    """Negate the score Grad-CAM maximises (the ITM match logit, or the image's ITC feature)."""
    with torch.no_grad():
        if variant == "itm":
            model.itm_head.weight[1].neg_()
            model.itm_head.bias[1].neg_()
        else:
            model.vision_proj.weight.neg_()
            model.vision_proj.bias.neg_()


@pytest.mark.parametrize("variant", ["itm", "itc"])
def test_attention_forced_onto_one_patch_peaks_there(model, variant):
    grid, (row, col) = 8, (5, 2)
    token = 1 + row * grid + col  # image token of that patch ([CLS] is 0)
    image, ids, att = make_batch(model.arch, b=1, seed=4)
    layer = default_layer(model, variant)
    if variant == "itm":
        cross = model.fusion.layers[layer].cross_attn
        handles = _force_onto(cross.q, cross.kv, 0, token, model.arch.text_width)
    else:
        qkv = model.vision.vit.blocks[layer].attn.qkv  # (q | k | v) along the features
        handles = _force_onto(qkv, qkv, model.arch.vision_width, token, model.arch.vision_width)
    run = itm_gradcam if variant == "itm" else itc_gradcam
    maps = []
    try:
        # The score's gradient at the patch is positive for the score or for its negation.
        maps.append(run(model, image, ids, att, layer).expression[0])
        _negate_score(model, variant)
        maps.append(run(model, image, ids, att, layer).expression[0])
        _negate_score(model, variant)
    finally:
        for h in handles:
            h.remove()
    peaked = [m for m in maps if m.max() > 1e-6]
    assert peaked
    for m in peaked:
        assert divmod(m.argmax().item(), grid) == (row, col)
        assert (m > 1e-6).sum() == 1  # nothing but that patch


def test_word_maps_merge_word_pieces_and_skip_special_tokens():
    maps = torch.arange(6, dtype=torch.float32)[:, None, None].expand(6, 2, 2)
    words = word_maps(["[CLS]", "a", "squ", "##are", "dog", "[PAD]"], maps)
    assert [w for w, _ in words] == ["a", "square", "dog"]
    assert [m[0, 0].item() for _, m in words] == [1.0, 2.5, 4.0]


def test_explain_cli_writes_a_png(tmp_path, model, capsys):
    from albef_ray.cli import main
    from albef_ray.data.tokenizer import train_wordpiece

    train_wordpiece(["a red circle above a blue square"], tmp_path / "tok")
    torch.save({"model": {f"model.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "ckpt.pth")
    Image.fromarray((np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8)).save(tmp_path / "img.png")
    common = ["--checkpoint", str(tmp_path / "ckpt.pth"), "--size", "albef_tiny_64", "--tokenizer", str(tmp_path / "tok"),
              "--device", "cpu", str(tmp_path / "img.png"), "a red circle"]
    for variant in ("itm", "itc"):
        out = tmp_path / f"{variant}.png"
        assert main(["explain", *common, "--variant", variant, "--out", str(out)]) == 0
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert Image.open(out).size[0] > 200
    assert "wrote" in capsys.readouterr().out
    assert main(["explain", *common, "--layer", "3", "--out", str(tmp_path / "x.png")]) == 2
    assert "layers 1..2" in capsys.readouterr().err
