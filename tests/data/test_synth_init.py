"""`albef-ray data synth-init`: unimodal initial weights of the synthetic benchmark (no Ray)."""

import json

import pytest
import torch
import torch.nn.functional as F

from albef_ray.cli import main
from albef_ray.data.collate import load_tokenizer, tokenize
from albef_ray.synth.scenes import Scene, Thing
from albef_ray.synth.benchmark import SynthConfig, build_synth
from albef_ray.data.transforms import normalize
from albef_ray.eval import load_split
from albef_ray.model.loading import build_model_from_config
from albef_ray.synth.unimodal import BERT_DIR, LABELS, REPORT_FILE, VIT_FILE, scene_labels
from tests.conftest import tiny_cfg

pytestmark = pytest.mark.slow


def test_scene_labels_mark_exactly_the_objects_present():
    scene = Scene("horizontal", (Thing("small", "red", "circle"), Thing("large", "blue", "star"), Thing("small", "red", "circle")))
    y = scene_labels(scene)
    assert y.shape == (len(LABELS),) and y.sum() == 2  # the repeated object is one label
    assert y[LABELS.index(("small", "red", "circle"))] == 1 and y[LABELS.index(("large", "blue", "star"))] == 1


@pytest.fixture(scope="module")
def initialised(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_init") / "synth"
    build_synth(root, SynthConfig(seed=0, train=256, val=32, test=16, image_size=32, noise=0.2), progress=False)
    args = ["data", "synth-init", str(root), "--vision-steps", "400", "--text-steps", "100", "--batch-size", "32"]
    assert main(args) == 0
    return root


def _mean_offdiag_cosine(feat):
    feat = F.normalize(feat, dim=-1)
    c = feat @ feat.T
    n = c.shape[0]
    return float((c.sum() - c.diag().sum()) / (n * n - n))


def test_the_weights_load_through_the_real_init_paths(initialised):
    from transformers import BertModel

    out = initialised / "init"
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["vit_init"] == str(out / VIT_FILE) and report["bert_init"] == str(out / BERT_DIR)
    assert 0 <= report["vision_val"]["object_recall"] <= 1 and 0 <= report["text_val"]["mlm_accuracy"] <= 1

    cfg = tiny_cfg(model={"vit_init": report["vit_init"], "bert_init": report["bert_init"]})
    model = build_model_from_config(cfg).eval()
    vit = torch.load(out / VIT_FILE, weights_only=True)
    assert set(vit) == {k.removeprefix("vit.") for k in model.vision.state_dict()}
    for key, value in vit.items():
        torch.testing.assert_close(model.vision.state_dict()["vit." + key], value, rtol=0, atol=0)

    # Our text encoder (the first text_layers of the BERT) reproduces HF BERT's hidden states there.
    bert = BertModel.from_pretrained(out / BERT_DIR, add_pooling_layer=False).eval()
    tokenizer = load_tokenizer(str(initialised))
    ids, mask = tokenize(tokenizer, ["a small red circle left of a large blue star", "a large cyan hexagon"], 30)
    with torch.no_grad():
        ours = model.encode_text(ids, mask)
        theirs = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[model.arch.text_layers]
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], rtol=1e-4, atol=1e-4)


def test_the_trained_image_encoder_tells_scenes_apart_better_than_random_init(initialised):
    """The point of the warm start: random ViT [CLS] features of all scenes are nearly parallel."""
    cfg = tiny_cfg(data={"shards": [str(initialised)]})
    images = normalize(load_split([str(initialised)], "val", cfg).images)
    torch.manual_seed(0)
    cold = build_model_from_config(cfg).eval()
    warm = build_model_from_config(tiny_cfg(model={"vit_init": str(initialised / "init" / VIT_FILE)})).eval()
    with torch.no_grad():
        cold_cos = _mean_offdiag_cosine(cold.encode_image(images)[:, 0])
        warm_cos = _mean_offdiag_cosine(warm.encode_image(images)[:, 0])
    assert cold_cos > 0.9
    assert warm_cos < cold_cos - 0.2, (warm_cos, cold_cos)


def test_a_dataset_that_is_not_synthetic_is_refused(tmp_path, initialised, capsys):
    manifest = json.loads((initialised / "manifest.json").read_text())
    del manifest["synth"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert main(["data", "synth-init", str(tmp_path)]) == 2
    assert "not a synthetic benchmark dataset" in capsys.readouterr().err
    assert main(["data", "synth-init", str(initialised), "--size", "albef_huge"]) == 2
    assert "unknown model size 'albef_huge'" in capsys.readouterr().err
