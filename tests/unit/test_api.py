"""The model API (albef_ray.load): same features and scores as the training path, every checkpoint kind."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import albef_ray
from albef_ray.api import AlbefModel, load
from albef_ray.config import dump_yaml
from albef_ray.data.tokenizer import train_wordpiece
from albef_ray.data.transforms import eval_transform
from albef_ray.model.adapters import native_to_albef
from albef_ray.model.albef import build_model
from albef_ray.objectives.pretrain import PretrainTask
from tests.conftest import tiny_cfg

TEXTS = ["a red circle above a blue square", "a small green star", "two triangles, left of a large circle"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_wordpiece(TEXTS, tmp_path_factory.mktemp("api") / "tok")


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((40 + 7 * i, 50, 3)) * 255).astype(np.uint8)) for i in range(n)]


def _perturbed_task() -> PretrainTask:
    task = PretrainTask(build_model("albef_tiny"), tiny_cfg())
    with torch.no_grad():
        for p in task.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return task


def test_features_and_scores_equal_the_training_path(tokenizer):
    albef = load(size="albef_tiny", tokenizer=tokenizer)
    images, texts = _images(3), TEXTS
    model = albef.model
    pixels = albef.preprocess_images(images)
    ids, mask = albef.tokenize(texts)
    with torch.no_grad():
        out = model(pixels, ids, mask)  # ALBEF.forward, as the objectives call it
        fused = model.fuse(out["text_hidden"], mask, out["image_tokens"])
        itm = model.itm_logits(fused).softmax(-1)[:, 1]
    torch.testing.assert_close(albef.image_features(images), out["image_feat"])
    torch.testing.assert_close(albef.text_features(texts), out["text_feat"])
    torch.testing.assert_close(albef.multimodal_features(images, texts), fused)
    torch.testing.assert_close(albef.multimodal_features(images, texts, cls_only=True), fused[:, 0])
    torch.testing.assert_close(albef.itm_probability(images, texts), itm)
    sim = albef.itc_similarity(images, texts)
    assert sim.shape == (3, 3)
    torch.testing.assert_close(sim, out["image_feat"] @ out["text_feat"].T / model.temp)
    # One image for many texts: encoded once, shared through the fusion encoder's image_index.
    one = albef.itm_probability(images[:1], texts)
    torch.testing.assert_close(one, albef.itm_probability(images[:1] * 3, texts))


def test_images_go_through_the_training_eval_transform(tokenizer, tmp_path):
    albef = load(size="albef_tiny", tokenizer=tokenizer)
    image = _images(1)[0]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    (tmp_path / "x.png").write_bytes(buffer.getvalue())
    expected = eval_transform(buffer.getvalue(), 32)[None]
    torch.testing.assert_close(albef.preprocess_images(image), expected)
    torch.testing.assert_close(albef.preprocess_images([tmp_path / "x.png"]), expected)
    torch.testing.assert_close(albef.preprocess_images(buffer.getvalue()), expected)
    assert albef.tokens("A Red, circle!")[:4] == ["[CLS]", "a", "red", "circle"]  # pre_caption, [CLS] caption


def test_loads_an_official_layout_checkpoint(tokenizer, tmp_path):
    src = _perturbed_task()
    official = native_to_albef(src.state_dict(), src.model.arch.text_layers)
    assert "text_encoder.bert.embeddings.word_embeddings.weight" in official
    torch.save({"model": official, "config": {}}, tmp_path / "ALBEF.pth")
    albef = load(tmp_path / "ALBEF.pth", size="albef_tiny", tokenizer=tokenizer)
    for key, value in src.model.state_dict().items():
        assert torch.equal(albef.model.state_dict()[key], value), key
    src.model.eval()
    pixels = albef.preprocess_images(_images(2))
    with torch.no_grad():
        expected = src.model.image_features(src.model.encode_image(pixels))
    torch.testing.assert_close(albef.image_features(_images(2)), expected)


def test_loads_our_run_directory_with_its_config(tokenizer, tmp_path):
    src = _perturbed_task()
    ckpt = tmp_path / "run" / "checkpoint_000002"
    ckpt.mkdir(parents=True)
    torch.save({"model": src.state_dict(), "progress": {"step": 7}}, ckpt / "state.pt")
    (ckpt / "config.yaml").write_text(dump_yaml(tiny_cfg(data={"max_text_len": 6})))
    albef = load(tmp_path / "run", tokenizer=tokenizer)  # size and caption length from config.yaml
    assert albef.cfg.model.size == "albef_tiny" and albef.tokenize(TEXTS[0])[0].shape == (1, 6)
    for key, value in src.model.state_dict().items():
        assert torch.equal(albef.model.state_dict()[key], value), key


def test_bf16_scores_are_close_to_fp32(tokenizer):
    torch.manual_seed(0)
    model = build_model("albef_tiny")
    fp32 = AlbefModel(model, tokenizer, tiny_cfg(), torch.device("cpu"))
    bf16 = AlbefModel(model, tokenizer, tiny_cfg(), torch.device("cpu"), precision="bf16")
    images = _images(2)
    torch.testing.assert_close(bf16.image_features(images), fp32.image_features(images), atol=0.05, rtol=0)
    torch.testing.assert_close(bf16.itm_probability(images, TEXTS[:2]), fp32.itm_probability(images, TEXTS[:2]), atol=0.05, rtol=0)
    assert bf16.image_features(images).dtype == torch.float32


def test_explain_returns_maps_on_the_patch_grid(tokenizer):
    albef = load(size="albef_tiny", tokenizer=tokenizer)
    cam, words = albef.explain(_images(1)[0], "a red circle")
    assert cam.expression.shape == (1, 4, 4) and cam.tokens.shape == (1, 4, 4, 4)
    assert [w for w, _ in words] == ["a", "red", "circle"]
    cam, words = albef.explain(_images(1)[0], "a red circle", variant="itc")
    assert cam.expression.shape == (1, 4, 4) and cam.tokens is None and words == []
    with pytest.raises(ValueError, match="variant"):
        albef.explain(_images(1)[0], "a red circle", variant="mlm")


def test_package_exports_load_lazily():
    assert albef_ray.load is load
    code = "import sys, albef_ray; assert 'torch' not in sys.modules; print('light')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "light"
