"""Each weight loader round-trips a checkpoint it built in the foreign layout."""

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from albef_ray.model.adapters import albef_to_native, hf_bert_to_native, native_to_albef, native_to_hf_bert
from albef_ray.model.albef import build_model
from albef_ray.model.loading import load_albef_checkpoint, load_bert, load_vit
from albef_ray.objectives.pretrain import PretrainTask
from tests.conftest import make_batch, tiny_cfg


def _hf_tiny_bert(arch):
    cfg = BertConfig(
        vocab_size=arch.vocab_size, hidden_size=arch.text_width, num_hidden_layers=arch.text_layers + arch.fusion_layers,
        num_attention_heads=arch.text_heads, intermediate_size=arch.text_intermediate,
        max_position_embeddings=arch.max_position, layer_norm_eps=arch.layer_norm_eps,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(1)
    return BertForMaskedLM(cfg).eval()


def test_hf_bert_directory_loads_and_matches_hf_outputs(tmp_path):
    model = build_model("albef_tiny").eval()
    hf = _hf_tiny_bert(model.arch)
    hf.save_pretrained(tmp_path / "bert")
    report = load_bert(model, str(tmp_path / "bert"))
    assert not [k for k in report.missing if k.startswith("text.")], str(report)
    assert all("cross_attn" in k for k in report.missing), "only cross-attention has no BERT weights"
    assert not report.unused, str(report)

    _, ids, att = make_batch(model.arch, b=3)
    with torch.no_grad():
        ours = model.encode_text(ids, att)
        # HF with only the text layers = our text encoder
        hf_hidden = hf.bert(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states
    torch.testing.assert_close(ours, hf_hidden[model.arch.text_layers], atol=1e-5, rtol=1e-5)
    # Fusion self-attention/FFN weights came from the upper BERT layers.
    hf_state = hf.state_dict()
    torch.testing.assert_close(
        model.fusion.layers[0].ffn.fc1.weight, hf_state[f"bert.encoder.layer.{model.arch.text_layers}.intermediate.dense.weight"]
    )
    torch.testing.assert_close(model.mlm_head.bias, hf_state["cls.predictions.bias"])


def test_hf_mapping_round_trip_and_tf_layernorm_names():
    model = build_model("albef_tiny")
    native = {k: v for k, v in model.state_dict().items() if k.startswith(("text.", "fusion.", "mlm_head."))}
    hf = native_to_hf_bert(native, model.arch.text_layers)
    assert "bert.encoder.layer.0.attention.self.query.weight" in hf
    assert "bert.encoder.layer.2.crossattention.self.value.bias" in hf  # first fusion layer of tiny
    back, unused = hf_bert_to_native(hf, model.arch.text_layers)
    assert not unused and back.keys() == native.keys()
    for k in native:
        assert torch.equal(back[k], native[k]), k
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in hf.items()}
    back_old, _ = hf_bert_to_native(old, model.arch.text_layers)
    assert torch.equal(back_old["text.embeddings.norm.weight"], native["text.embeddings.norm.weight"])


def test_incomplete_qkv_is_an_error():
    model = build_model("albef_tiny")
    hf = native_to_hf_bert(model.state_dict(), model.arch.text_layers)
    del hf["bert.encoder.layer.0.attention.self.key.weight"]
    with pytest.raises(ValueError, match="query/key/value"):
        hf_bert_to_native(hf, model.arch.text_layers)


def test_timm_vit_file_at_224_loads_at_256_with_interpolation(tmp_path):
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    torch.save({"model": vit.state_dict()}, tmp_path / "deit_like.pth")  # DeiT wraps weights in "model"
    from albef_ray.model.registry import AlbefArch
    from albef_ray.model.albef import ALBEF

    arch = AlbefArch(image_res=256, vision_width=192, vision_depth=12, vision_heads=3, text_width=64, text_layers=1,
                     fusion_layers=1, text_heads=2, text_intermediate=64, vocab_size=300)
    model = ALBEF(arch)
    report = load_vit(model, str(tmp_path / "deit_like.pth"))
    assert not report.missing, str(report)
    assert any("position embedding resized" in n for n in report.notes)
    assert model.vision.vit.pos_embed.shape == (1, 257, 192)
    torch.testing.assert_close(model.vision.vit.pos_embed[:, 0], vit.pos_embed[:, 0])
    torch.testing.assert_close(model.vision.vit.blocks[3].attn.qkv.weight, vit.blocks[3].attn.qkv.weight)


def test_vit_shape_mismatch_is_a_clear_error(tmp_path):
    import timm

    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match="shape mismatch"):
        load_vit(build_model("albef_tiny"), str(tmp_path / "w.pth"))


@pytest.mark.parametrize("finetuned", [False, True])
def test_albef_checkpoint_round_trip(tmp_path, finetuned):
    cfg = tiny_cfg()
    src = PretrainTask(build_model("albef_tiny"), cfg)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
        src.momentum.queue_ptr.fill_(12)
    official = native_to_albef(src.state_dict(), src.model.arch.text_layers, finetuned=finetuned)
    if finetuned:
        official = {k: v for k, v in official.items() if "_m." not in k and "queue" not in k}
        assert "text_encoder.embeddings.word_embeddings.weight" in official
    else:
        assert "text_encoder.bert.embeddings.word_embeddings.weight" in official
        assert "visual_encoder_m.pos_embed" in official and "image_queue" in official
    torch.save({"model": official, "config": {}}, tmp_path / "ckpt.pth")

    dst = PretrainTask(build_model("albef_tiny"), cfg)
    report = load_albef_checkpoint(dst, str(tmp_path / "ckpt.pth"))
    assert not report.unused, str(report)
    src_state, dst_state = src.state_dict(), dst.state_dict()
    if finetuned:  # no MLM head, no momentum weights: momentum copies the online model
        assert report.missing and all(k.startswith(("model.mlm_head", "momentum.image_queue", "momentum.text_queue", "momentum.queue_ptr")) for k in report.missing), str(report)
        assert any("copied from online" in n for n in report.notes)
        torch.testing.assert_close(dst.momentum.model.vision.vit.pos_embed, src.model.vision.vit.pos_embed)
        keys = [k for k in src_state if k.startswith("model.") and not k.startswith("model.mlm_head.")]
    else:
        assert not report.missing, str(report)
        keys = list(src_state)
    for k in keys:
        assert torch.equal(src_state[k], dst_state[k]), k


def test_albef_checkpoint_into_bare_model_and_resized_queue(tmp_path):
    src = PretrainTask(build_model("albef_tiny"), tiny_cfg(momentum={"queue_size": 64}))
    official = native_to_albef(src.state_dict(), src.model.arch.text_layers)
    torch.save({"model": official}, tmp_path / "ckpt.pth")
    model = build_model("albef_tiny")
    report = load_albef_checkpoint(model, str(tmp_path / "ckpt.pth"))
    assert not report.missing
    assert torch.equal(model.itm_head.weight, src.model.itm_head.weight)
    task = PretrainTask(build_model("albef_tiny"), tiny_cfg(momentum={"queue_size": 32}))
    report = load_albef_checkpoint(task, str(tmp_path / "ckpt.pth"))
    assert any("does not fit" in n for n in report.notes)


def test_albef_unknown_keys_are_reported():
    native, unused = albef_to_native({"temp": torch.tensor(0.07), "something_else.weight": torch.ones(1)}, 2)
    assert unused == ["something_else.weight"] and "model.temp" in native


def test_build_task_loads_configured_checkpoint_in_native_layout(tmp_path):
    from albef_ray.tasks import build_task

    src = PretrainTask(build_model("albef_tiny"), tiny_cfg())
    torch.save({"model": src.state_dict()}, tmp_path / "native.pth")
    task = build_task(tiny_cfg(model={"checkpoint": str(tmp_path / "native.pth")}))
    for k, v in src.state_dict().items():
        assert torch.equal(task.state_dict()[k], v), k
