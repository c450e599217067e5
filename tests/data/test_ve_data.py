"""SNLI-VE data: the official JSON format read into shards (bad inputs skipped and counted), the
embedded generator's labels against the scene by hand, and a short fine-tune + evaluation on it."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from albef_ray.config import build_config
from albef_ray.data.build.sources import formats, source_from_dict
from albef_ray.data.build.ve import VE_LABELS, VEJsonSource
from albef_ray.data.build.writer import write_dataset
from albef_ray.data.manifest import shard_paths
from albef_ray.synth.scenes import Scene, Thing
from albef_ray.synth.tasks import SynthTaskSettings
from albef_ray.synth.ve import (
    CONTRADICTION,
    ENTAILMENT,
    NEUTRAL,
    Fact,
    Hypothesis,
    Ref,
    Unknowable,
    build_ve,
    plan_ve,
)

from .samples import image_bytes
from .shard_fixtures import make_tokenizer


def test_label_ids_are_the_official_ones():
    assert (VE_LABELS.index("contradiction"), VE_LABELS.index("neutral"), VE_LABELS.index("entailment")) == (0, 1, 2)
    assert (CONTRADICTION, NEUTRAL, ENTAILMENT) == (0, 1, 2)
    assert formats()["ve_json"] is VEJsonSource


def _write_json(tmp_path, entries):
    path = tmp_path / "ve_train.json"
    path.write_text(json.dumps(entries))
    return path


def test_official_json_is_read_per_image_with_bad_inputs_skipped_and_counted(tmp_path):
    images = tmp_path / "flickr30k-images"
    images.mkdir()
    (images / "1001.jpg").write_bytes(image_bytes(1))
    (images / "1002.jpg").write_bytes(image_bytes(2))
    (images / "1003.jpg").write_bytes(b"not a jpeg")  # a bad image: both its hypotheses go
    entries = [
        {"image": "1001", "sentence": "Two dogs run.", "label": "entailment"},
        {"image": "1003", "sentence": "A cat sleeps.", "label": "neutral"},
        {"image": "1002.jpg", "sentence": "A man sings.", "label": "contradiction"},
        {"image": "1001", "sentence": "   ", "label": "neutral"},  # an empty hypothesis: only it goes
        {"image": "1003", "sentence": "Nobody is there.", "label": "contradiction"},
        {"image": "1001", "sentence": "The dogs are asleep.", "label": "contradiction"},
        {"image": "9999", "sentence": "No such file.", "label": "entailment"},  # missing image
    ]
    path = _write_json(tmp_path, entries)
    source = source_from_dict({"name": "snli_ve", "format": "ve_json", "path": str(path),
                               "image_root": str(images), "split": "train"})
    source.check()
    assert source.count() == 4  # four distinct images, each one candidate
    manifest = write_dataset(tmp_path / "ds", [source], shuffle_seed=None, progress=False)
    rows = [r for p in shard_paths(tmp_path / "ds", "train") for r in pq.read_table(p).to_pylist()]
    got = sorted((r["image_id"], r["caption"], r["label"]) for r in rows)
    assert got == [("1001", "The dogs are asleep.", 0), ("1001", "Two dogs run.", 2), ("1002", "A man sings.", 0)]
    assert manifest["skipped"]["by_reason"] == {"unreadable_image": 1, "empty_caption": 1, "missing_image": 1}


def test_an_unknown_label_is_an_input_error_naming_file_and_row(tmp_path):
    path = _write_json(tmp_path, [{"image": "1", "sentence": "x", "label": "entailment"},
                                  {"image": "2", "sentence": "y", "label": "-"}])
    source = VEJsonSource("snli_ve", str(path), image_root=str(tmp_path))
    with pytest.raises(ValueError, match=r"entry 1: label '-'"):
        source.check()


# ----------------------------------------------------------------------------- embedded version

# small red circle, then large blue square, then small green circle, left to right
ROW = Scene("horizontal", (Thing("small", "red", "circle"), Thing("large", "blue", "square"),
                           Thing("small", "green", "circle")))
COLUMN = Scene("vertical", ROW.things)


@pytest.mark.parametrize("hypothesis, scene, text, label", [
    (Hypothesis("plain", Fact("exists", Ref("circle", colour="red"))), ROW, "there is a red circle", ENTAILMENT),
    (Hypothesis("plain", Fact("exists", Ref("square", size="small"))), ROW, "there is a small square", CONTRADICTION),
    (Hypothesis("and", Fact("exists", Ref("star")), Unknowable("moving")), ROW,
     "there is a star and it is moving", CONTRADICTION),
    (Hypothesis("and", Fact("exists", Ref("square", colour="blue")), Unknowable("made of wood")), ROW,
     "there is a blue square and it is made of wood", NEUTRAL),
    (Hypothesis("plain", Fact("attribute", Ref("square"), field="colour", value="blue")), ROW,
     "the square is blue", ENTAILMENT),
    (Hypothesis("or", Fact("attribute", Ref("square"), field="size", value="small"), Unknowable("heavy", Ref("circle", colour="red"))),
     ROW, "the square is small or the red circle is heavy", NEUTRAL),
    (Hypothesis("or", Fact("attribute", Ref("circle", colour="green"), field="size", value="small"),
                Unknowable("behind", Ref("square"), Ref("circle", colour="red"))),
     ROW, "the green circle is small or the square is behind the red circle", ENTAILMENT),
    (Hypothesis("plain", Fact("relation", Ref("circle", colour="red"), other=Ref("square"), before=True)), ROW,
     "the red circle is left of the square", ENTAILMENT),
    (Hypothesis("plain", Fact("relation", Ref("circle", colour="green"), other=Ref("square"), before=True)), ROW,
     "the green circle is left of the square", CONTRADICTION),
    (Hypothesis("and", Fact("relation", Ref("circle", colour="green"), other=Ref("circle", colour="red"), before=False),
                Unknowable("hot")), COLUMN, "the green circle is below the red circle and it is hot", NEUTRAL),
    (Hypothesis("and", Fact("relation", Ref("square"), other=Ref("circle", colour="red"), before=True),
                Unknowable("in front of", None, Ref("circle", colour="green"))), COLUMN,
     "the square is above the red circle and it is in front of the green circle", CONTRADICTION),
    (Hypothesis("plain", Fact("scene", described=ROW, template=0)), ROW,
     "a small red circle, a large blue square and a small green circle from left to right", ENTAILMENT),
    (Hypothesis("or", Fact("scene", described=Scene("horizontal", ROW.things[:2] + (Thing("large", "cyan", "star"),)),
                           template=0), Unknowable("moving", Ref("square", "blue", "large"))), ROW,
     ("a small red circle, a large blue square and a large cyan star from left to right or the large blue square "
      "is moving"), NEUTRAL),
    (Hypothesis("and", Fact("scene", described=COLUMN, template=0), Unknowable("hot", Ref("circle", "green", "small"))),
     COLUMN, ("a small red circle, a large blue square and a small green circle from top to bottom and the small "
              "green circle is hot"), NEUTRAL),
    (Hypothesis("and", Fact("scene", described=COLUMN, template=0), Unknowable("hot", Ref("circle", "green", "small"))),
     Scene("vertical", ROW.things[::-1]), ("a small red circle, a large blue square and a small green circle from "
                                           "top to bottom and the small green circle is hot"), CONTRADICTION),
])
def test_synthetic_hypotheses_get_the_label_the_scene_gives(hypothesis, scene, text, label):
    assert hypothesis.text(scene) == text
    assert hypothesis.label(scene) == label


def test_ambiguous_or_absent_objects_are_refused():
    with pytest.raises(ValueError, match="names 2 objects"):  # two circles: "the circle" is ambiguous
        Hypothesis("plain", Fact("attribute", Ref("circle"), field="colour", value="red")).label(ROW)
    with pytest.raises(ValueError, match="names 0 objects"):  # an unknowable clause about an absent object
        Hypothesis("or", Fact("exists", Ref("star")), Unknowable("moving", Ref("triangle"))).label(ROW)


def test_plan_is_balanced_held_out_and_deterministic():
    settings = SynthTaskSettings(tokenizer_from="unused", seed=3, train=300, val=30, test=60)
    plan = plan_ve(settings)
    assert {k: len(v) for k, v in plan.items()} == {"test": 20, "val": 10, "train": 100}
    held_out = {s.scene for split in ("val", "test") for s in plan[split]}
    assert len(held_out) == 30 and not held_out & {s.scene for s in plan["train"]}
    forms = {}
    for split in plan.values():
        for item in split:
            labels = sorted(h.label(item.scene) for h in item.hypotheses)
            assert labels == [0, 1, 2]  # one hypothesis per label, as the scene gives it
            for h in item.hypotheses:
                forms[(h.form, h.fact.holds(item.scene))] = forms.get((h.form, h.fact.holds(item.scene)), 0) + 1
    assert len(forms) == 6 and min(forms.values()) > 0.6 * max(forms.values())  # every form as often true as false
    again = plan_ve(SynthTaskSettings(tokenizer_from="unused", seed=3, train=300, val=30, test=60))
    assert [h.text(s.scene) for s in again["train"] for h in s.hypotheses] == \
        [h.text(s.scene) for s in plan["train"] for h in s.hypotheses]


@pytest.fixture(scope="module")
def synth_ve(tmp_path_factory):
    root = tmp_path_factory.mktemp("ve")
    make_tokenizer(root / "caption" / "tokenizer")
    settings = SynthTaskSettings(tokenizer_from=str(root / "caption"), train=48, val=0, test=24, image_size=32)
    manifest = build_ve(root / "ve", settings, progress=False)
    return root, manifest


def test_build_writes_labels_and_the_tokenizer(synth_ve):
    root, manifest = synth_ve
    assert manifest["splits"]["train"]["rows"] == 48 and (root / "ve" / "tokenizer" / "vocab.txt").exists()
    rows = [r for p in shard_paths(root / "ve", "test") for r in pq.read_table(p).to_pylist()]
    assert np.bincount([r["label"] for r in rows]).tolist() == [8, 8, 8]
    assert len({r["image_id"] for r in rows}) == 8 and all(r["width"] == 32 for r in rows)


def test_a_few_training_steps_and_the_evaluation_run(synth_ve, tmp_path):
    from albef_ray.cli import main
    from albef_ray.data.collate import load_tokenizer
    from albef_ray.eval.ve import evaluate_ve, split_batches
    from albef_ray.tasks import build_task
    from albef_ray.train.loop import Schedule, train_step
    from albef_ray.train.optim import build_optimizer

    root, _ = synth_ve
    cfg = build_config({
        "task": "ve", "model": {"size": "albef_tiny", "vit_init": None, "bert_init": None},
        "data": {"shards": [str(root / "ve")], "tokenizer": str(root / "ve" / "tokenizer"), "max_text_len": 40},
        "train": {"batch_size": 8, "num_workers": 1, "use_gpu": False, "precision": "fp32"},
        "optim": {"lr": 1e-3, "warmup_steps": 1}, "mod": {"alpha_warmup_epochs": 0}, "eval": {"split": "test", "batch_size": 16},
    })
    torch.manual_seed(0)
    task = build_task(cfg).train()
    optimizer = build_optimizer(task, cfg.optim)
    batches = list(split_batches(cfg, load_tokenizer(cfg.data.tokenizer), split="train"))
    schedule = Schedule(total_steps=4, steps_per_epoch=4)
    for step in range(4):
        metrics = train_step(task, optimizer, {k: v[:8] for k, v in batches[step % len(batches)].items() if v.ndim},
                             step, cfg, schedule)
        assert math.isfinite(metrics["loss"]) and not metrics["skipped"] and metrics["alpha"] > 0
    result = evaluate_ve(task, cfg)
    assert result["num_examples"] == 24 and 0 <= result["ve_acc"] <= 100

    torch.save({"model": task.state_dict()}, tmp_path / "state.pt")
    out = tmp_path / "metrics.json"
    (tmp_path / "ve.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["eval", "ve", "--config", str(tmp_path / "ve.yaml"), "--checkpoint", str(tmp_path / "state.pt"),
                 "--out", str(out), "tracking.enabled=false"]) == 0
    record = json.loads(out.read_text())
    assert record["ve_acc"] == pytest.approx(result["ve_acc"]) and record["num_examples"] == 24

    # with tracking on, the metrics land in MLflow (a run of their own: the file names no training run)
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["eval", "ve", "--config", str(tmp_path / "ve.yaml"), "--checkpoint", str(tmp_path / "state.pt"),
                 "tracking.enabled=true", f"tracking.tracking_uri={uri}"]) == 0
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert run.data.metrics["test/ve_acc"] == pytest.approx(result["ve_acc"])
    assert run.data.metrics["test/num_examples"] == 24 and run.info.status == "FINISHED"
    assert "ve_test.json" in [a.path for a in client.list_artifacts(run.info.run_id)]
