"""Shapes and invariants of the model for every registered size."""

import pytest
import torch

from albef_ray.model.albef import build_model
from albef_ray.model.momentum import MomentumEncoder
from albef_ray.model.registry import AlbefArch, get_arch, register_size
from albef_ray.model import text as text_module
from albef_ray.model.text import SelfAttention, causal_key_mask, group_queries
from albef_ray.model.vision import interpolate_pos_embed
from tests.conftest import ALL_SIZES, make_batch


@pytest.mark.parametrize("size", ALL_SIZES)
def test_feature_shapes(size):
    model = build_model(size).eval()
    arch = model.arch
    b = 2
    image, ids, att = make_batch(arch, b=b, t=7)
    with torch.no_grad():
        f = model(image, ids, att)
        n_tokens = 1 + arch.num_patches
        assert f["image_tokens"].shape == (b, n_tokens, arch.vision_width)
        assert f["text_hidden"].shape == (b, 7, arch.text_width)
        for key in ("image_feat", "text_feat"):
            assert f[key].shape == (b, 256)
            torch.testing.assert_close(f[key].norm(dim=-1), torch.ones(b))
        fused = model.fuse(f["text_hidden"], att, f["image_tokens"])
        assert fused.shape == (b, 7, arch.text_width)
        assert model.itm_logits(fused).shape == (b, 2)
        assert model.mlm_logits(fused).shape == (b, 7, arch.vocab_size)


def test_paper_size_numbers():
    arch = get_arch("albef_base")
    assert (arch.image_res, arch.patch_size, arch.vision_width, arch.vision_depth) == (256, 16, 768, 12)
    assert (arch.text_layers, arch.fusion_layers, arch.text_width, arch.vocab_size) == (6, 6, 768, 30522)
    assert get_arch("albef_base", 384).num_patches == 24 * 24


def test_registry_rejects_duplicates_and_unknown():
    with pytest.raises(ValueError, match="already registered"):
        register_size("albef_tiny", AlbefArch())
    with pytest.raises(KeyError, match="albef_huge"):
        get_arch("albef_huge")


def test_fusion_image_index_equals_gathered_images():
    model = build_model("albef_tiny").eval()
    image, ids, att = make_batch(model.arch, b=3)
    with torch.no_grad():
        tokens = model.encode_image(image)
        text = model.encode_text(ids, att)
        index = torch.tensor([2, 0, 0])
        shared = model.fuse(text, att, tokens, index)
        copied = model.fuse(text, att, tokens[index])
    torch.testing.assert_close(shared, copied)


def _fusion_inputs(model, rows=23, images=5, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(rows, t, model.arch.text_width, generator=g)
    lengths = torch.randint(2, t + 1, (rows,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    tokens = torch.randn(images, 17, model.arch.vision_width, generator=g)
    index = torch.randint(0, images, (rows,), generator=g)  # unsorted, images of 1 to many rows
    return text, mask, tokens, index


@pytest.mark.parametrize("device_path", ["cpu", "padded"])
@pytest.mark.parametrize("sort", [False, True])
def test_grouped_cross_attention_equals_the_gather_path(device_path, sort, monkeypatch):
    model = build_model("albef_tiny").eval()
    text, mask, tokens, index = _fusion_inputs(model)
    if sort:
        index = index.sort().values
    if device_path == "padded":  # the one-call layout used on GPUs, forced on the CPU
        monkeypatch.setattr(text_module, "_per_image_calls", lambda q: False)
    groups = group_queries(index)
    assert (groups.order is None) == sort
    with torch.no_grad():
        gathered = model.fuse(text, mask, tokens, index)
        grouped = model.fusion(text, mask, tokens, groups=groups)
        projected = model.fusion(text, mask, None, image_kv=model.fusion.project_image(tokens), groups=groups)
    torch.testing.assert_close(grouped, gathered, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(projected, gathered, atol=1e-6, rtol=1e-6)


def test_group_queries_layout():
    index = torch.tensor([4, 1, 4, 4, 0, 1, 4])  # image 4: 4 rows, 1: 2 rows, 0: 1 row
    groups = group_queries(index)
    assert groups.images == (0, 1, 4) and groups.counts == (1, 2, 4)
    assert torch.equal(groups.context_index, torch.tensor([0, 1, 4]))
    assert torch.equal(index[groups.order], torch.tensor([0, 1, 1, 4, 4, 4, 4]))
    assert torch.equal(groups.slots, torch.tensor([0, 4, 5, 8, 9, 10, 11]))  # padded to 4 per image


def test_cls_only_last_layer_equals_the_full_layers_cls():
    model = build_model("albef_tiny").eval()
    text, mask, tokens, index = _fusion_inputs(model)
    groups = group_queries(index)
    with torch.no_grad():
        full = model.fuse(text, mask, tokens, index)  # (B, T, C)
        cls = model.fusion(text, mask, tokens, index, cls_only=True)
        cls_grouped = model.fusion(text, mask, tokens, groups=groups, cls_only=True)
    assert cls.shape == (text.shape[0], 1, text.shape[2])
    torch.testing.assert_close(cls, full[:, :1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cls_grouped, full[:, :1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.itm_logits(cls), model.itm_logits(full), atol=1e-5, rtol=1e-5)


def test_cls_only_self_attention_with_a_causal_mask_is_row_zero():
    torch.manual_seed(0)
    attn = SelfAttention(32, 4, 1e-12, 0.0).eval()
    x = torch.randn(3, 7, 32)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    for key_mask in (mask.bool()[:, None, None, :], causal_key_mask(mask)):
        with torch.no_grad():
            torch.testing.assert_close(attn(x, key_mask, cls_only=True), attn(x, key_mask)[:, :1])


def test_padding_does_not_change_real_tokens():
    model = build_model("albef_tiny").eval()
    image, ids, att = make_batch(model.arch, b=1, t=6)
    padded_ids = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    padded_att = torch.cat([att, torch.zeros(1, 4, dtype=torch.long)], 1)
    with torch.no_grad():
        tokens = model.encode_image(image)
        a = model.fuse(model.encode_text(ids, att), att, tokens)
        b = model.fuse(model.encode_text(padded_ids, padded_att), padded_att, tokens)
    torch.testing.assert_close(a, b[:, :6], atol=1e-5, rtol=1e-5)


def test_mlm_head_is_tied_to_word_embeddings():
    model = build_model("albef_tiny").eval()
    x = torch.randn(3, model.arch.text_width)
    before = model.mlm_logits(x)
    with torch.no_grad():
        model.text.embeddings.word.weight[5] += torch.randn(model.arch.text_width)
    assert not torch.allclose(before[:, 5], model.mlm_logits(x)[:, 5])
    assert "mlm_head.word_embeddings.weight" not in model.state_dict()


def test_interpolate_pos_embed_keeps_cls_and_resizes():
    pe = torch.randn(1, 1 + 14 * 14, 8)
    out = interpolate_pos_embed(pe, 16 * 16)
    assert out.shape == (1, 1 + 256, 8)
    torch.testing.assert_close(out[:, 0], pe[:, 0])
    assert interpolate_pos_embed(pe, 14 * 14) is pe
    # A constant grid stays constant under bicubic resampling.
    const = torch.cat([torch.zeros(1, 1, 8), torch.full((1, 196, 8), 0.5)], 1)
    torch.testing.assert_close(interpolate_pos_embed(const, 576)[:, 1:], torch.full((1, 576, 8), 0.5))
    with pytest.raises(ValueError, match="non-square"):
        interpolate_pos_embed(torch.randn(1, 1 + 15, 8), 16)


def test_ema_m0_copies_and_m1_freezes():
    model = build_model("albef_tiny")
    mom = MomentumEncoder(model, momentum=0.995, queue_size=8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    frozen = {k: v.clone() for k, v in mom.model.state_dict().items()}
    mom.update(model, momentum=1.0)
    for k, v in mom.model.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    mom.update(model, momentum=0.0)
    online = model.state_dict()
    for k, v in mom.model.state_dict().items():
        assert torch.equal(v, online[k]), k
    assert "itm_head.weight" not in mom.model.state_dict() and not hasattr(mom.model, "temp")


def test_ema_formula_and_no_grad():
    model = build_model("albef_tiny")
    mom = MomentumEncoder(model, momentum=0.9, queue_size=8)
    assert all(not p.requires_grad for p in mom.parameters())
    p_m0 = mom.model.vision_proj.weight.clone()
    with torch.no_grad():
        model.vision_proj.weight.add_(1.0)
    mom.update(model)
    torch.testing.assert_close(mom.model.vision_proj.weight, 0.9 * p_m0 + 0.1 * model.vision_proj.weight)


def test_queue_wraps_around_and_rejects_indivisible_batch():
    model = build_model("albef_tiny")
    mom = MomentumEncoder(model, queue_size=6)
    feats = [torch.nn.functional.normalize(torch.randn(2, 256), dim=-1) for _ in range(4)]
    for f in feats:
        mom.enqueue(f, -f)
    # 4 batches of 2 into 6 slots: the 4th batch overwrote slots 0-1.
    assert int(mom.queue_ptr) == 2
    torch.testing.assert_close(mom.image_queue[:, 0:2], feats[3].T)
    torch.testing.assert_close(mom.image_queue[:, 2:4], feats[1].T)
    torch.testing.assert_close(mom.text_queue[:, 4:6], -feats[2].T)
    with pytest.raises(ValueError, match="not divisible"):
        mom.enqueue(torch.randn(4, 256), torch.randn(4, 256))


def test_queue_gathers_global_batch():
    model = build_model("albef_tiny")
    mom = MomentumEncoder(model, queue_size=8)
    f = torch.randn(2, 256)
    mom.enqueue(f, f, gather=lambda t: torch.cat([t, t + 1]))  # a 2-process gather
    assert int(mom.queue_ptr) == 4
    torch.testing.assert_close(mom.image_queue[:, 2:4], (f + 1).T)


def test_model_and_objectives_do_not_import_ray():
    import subprocess
    import sys

    code = (
        "import sys; import albef_ray.objectives.pretrain, albef_ray.model.loading, albef_ray.config; "
        "print(any(m == 'ray' or m.startswith('ray.') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
