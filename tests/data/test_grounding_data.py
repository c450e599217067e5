"""Grounding data: the official RefCOCO+ formats as a source, the embedded generator checked by hand,
and a short end to end run (train steps, evaluation, heat maps into MLflow, `eval grounding`)."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from albef_ray.config import build_config
from albef_ray.data.build.sources import parse_source_spec
from albef_ray.data.build.writer import write_dataset
from albef_ray.data.manifest import shard_paths
from albef_ray.synth.benchmark import COLOURS, render
from albef_ray.synth.grounding import (
    Description,
    Expression,
    build_grounding,
    object_boxes,
    resolve,
    sample_expression,
)
from albef_ray.synth.scenes import Scene, Thing
from albef_ray.synth.tasks import SynthTaskSettings

from .samples import image_bytes
from .shard_fixtures import make_tokenizer

SPATIAL_WORDS = ("left", "right", "above", "below", "top", "bottom")


# ----------------------------------------------------------------------------- the official formats


class _NotPlain:
    pass


def _refcoco(tmp_path):
    """ALBEF's refcoco+_test.json, MAttNet dets.json, REFER refs(unc).p + instances.json, 3 images."""
    coco = tmp_path / "coco"
    coco.mkdir()
    (coco / "a.jpg").write_bytes(image_bytes(1, size=(40, 30)))
    (coco / "b.jpg").write_bytes(image_bytes(2, size=(40, 30)))
    (coco / "bad.jpg").write_bytes(b"not an image")
    entries = [
        {"image": "a.jpg", "text": "man in red", "ref_id": 1},
        {"image": "a.jpg", "text": "dog", "ref_id": 2},  # REFER puts it in testB
        {"image": "b.jpg", "text": "   ", "ref_id": 3},  # empty: skipped alone
        {"image": "b.jpg", "text": "white cup", "ref_id": 4},
        {"image": "bad.jpg", "text": "chair", "ref_id": 5},  # undecodable: skipped
    ]
    (tmp_path / "refcoco+_test.json").write_text(json.dumps(entries))
    refs = [{"ref_id": r, "ann_id": 10 + r, "image_id": img, "split": split, "sentences": []}
            for r, img, split in ((1, 100, "testA"), (2, 100, "testB"), (3, 200, "testA"), (4, 200, "testA"),
                                  (5, 300, "testA"))]
    with open(tmp_path / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    anns = [{"id": 10 + r, "image_id": 0, "bbox": [r, 2.5, 10, 8], "category_id": 1} for r in range(1, 6)]
    (tmp_path / "instances.json").write_text(json.dumps({"images": [], "annotations": anns, "categories": []}))
    dets = {"100": [[0, 0, 10, 10, 0.9], [1, 2.5, 10, 8, 0.7]], "200": [[3, 4, 5, 6, 0.5]]}
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    return tmp_path


def test_official_refcoco_files_become_rows_with_box_proposals_and_ref_id(tmp_path):
    root = _refcoco(tmp_path)
    spec = (f"name=refcoco+_testA,format=grounding_json,path={root / 'refcoco+_test.json'},image_root={root / 'coco'},"
            f"split=testA,ref_split=testA,dets={root / 'dets.json'},refs={root / 'refs(unc).p'},"
            f"instances={root / 'instances.json'}")
    manifest = write_dataset(tmp_path / "ds", [parse_source_spec(spec)], shuffle_seed=None, progress=False)
    rows = [r for p in shard_paths(tmp_path / "ds", "testA") for r in pq.read_table(p).to_pylist()]
    got = {r["ref_id"]: r for r in rows}
    assert sorted(got) == ["1", "4"]  # 2 is testB (left out, not a skip), 3 empty, 5 undecodable
    assert got["1"]["caption"] == "man in red" and got["1"]["box"] == [1.0, 2.5, 10.0, 8.0]
    assert got["1"]["proposals"] == [[0.0, 0.0, 10.0, 10.0], [1.0, 2.5, 10.0, 8.0]]
    assert got["4"]["box"] == [4.0, 2.5, 10.0, 8.0] and got["4"]["proposals"] == [[3.0, 4.0, 5.0, 6.0]]
    assert (got["1"]["width"], got["1"]["height"]) == (40, 30)
    assert manifest["skipped"]["by_reason"] == {"empty_caption": 1, "unreadable_image": 1}

    train = parse_source_spec(f"name=train,format=grounding_json,path={root / 'refcoco+_test.json'},"
                              f"image_root={root / 'coco'},split=train")
    write_dataset(tmp_path / "train", [train], shuffle_seed=None, progress=False)
    table = pq.read_table(shard_paths(tmp_path / "train", "train")[0])
    assert "box" not in table.column_names and table.column("ref_id").to_pylist() == ["1", "2", "4"]
    assert table.column("image_id").to_pylist() == ["a.jpg", "a.jpg", "b.jpg"]  # one image: one retrieval group


def test_refs_pickle_with_objects_and_dets_without_refs_are_refused(tmp_path):
    root = _refcoco(tmp_path)
    with open(tmp_path / "evil.p", "wb") as f:
        pickle.dump([{"ref_id": 1, "x": _NotPlain()}], f)
    base = f"name=r,format=grounding_json,path={root / 'refcoco+_test.json'},image_root={root / 'coco'}"
    with pytest.raises(ValueError, match="only plain lists"):
        parse_source_spec(f"{base},refs={tmp_path / 'evil.p'},instances={root / 'instances.json'}").check()
    with pytest.raises(ValueError, match="dets=.* needs refs"):
        parse_source_spec(f"{base},dets={root / 'dets.json'}").check()


# ----------------------------------------------------------------------------- the embedded benchmark by hand

ROW = Scene("horizontal", (Thing("small", "red", "circle"), Thing("large", "blue", "circle"), Thing("small", "green", "star")))
COLUMN = Scene("vertical", (Thing("large", "red", "square"), Thing("small", "red", "square")))


def test_expressions_mean_what_they_say():
    first = Expression(0, Description("circle"), end="first")
    assert first.text("horizontal") == "the circle on the left" and resolve(ROW, first) == [0]
    last = Expression(1, Description("circle"), end="last")
    assert last.text("vertical") == "the circle at the bottom" and resolve(ROW, last) == [1]
    # Both circles are left of the star: not an expression of either.
    assert resolve(ROW, Expression(1, Description("circle"), anchor=Description("star"), before=True)) == [0, 1]
    # The blue circle is right of the red one.
    right = Expression(1, Description("circle"), anchor=Description("circle", colour="red"), before=False)
    assert right.text("horizontal") == "the circle right of the red circle" and resolve(ROW, right) == [1]
    small = Expression(0, Description("circle", size="small"))
    assert small.text("horizontal") == "the small circle" and small.kind == "attribute" and resolve(ROW, small) == [0]
    below = Expression(1, Description("square", colour="red"), anchor=Description("square", size="large"), before=False)
    assert below.text("vertical") == "the red square below the large square" and resolve(COLUMN, below) == [1]


def test_sampled_expressions_name_their_target_alone():
    rng = np.random.default_rng(0)
    for _ in range(50):
        for target in range(3):
            attribute = sample_expression(ROW, target, "attribute", rng)
            assert resolve(ROW, attribute) == [target] and not any(w in attribute.text("horizontal") for w in SPATIAL_WORDS)
        spatial = sample_expression(ROW, 0, "spatial", rng)  # "circle" names both circles: position decides
        assert resolve(ROW, spatial) == [0] and sum(spatial.subject.matches(t) for t in ROW.things) > 1
    assert sample_expression(ROW, 2, "spatial", rng) is None  # the only star: nothing for space to decide


def test_object_boxes_hold_exactly_the_drawn_objects():
    for key in ([0, 40, 0], [0, 42, 7]):
        for scene in (ROW, COLUMN):
            pixels = np.asarray(render(scene, 64, np.random.default_rng(key)), dtype=np.int32)  # (64, 64, 3)
            boxes = object_boxes(scene, 64, key)
            covered = np.zeros((64, 64), bool)
            for thing, (x, y, w, h) in zip(scene.things, boxes):
                inside = np.zeros((64, 64), bool)
                inside[int(y):int(np.ceil(y + h)), int(x):int(np.ceil(x + w))] = True
                colour = np.abs(pixels - np.array(COLOURS[thing.colour])).sum(-1) < 30  # the object's own colour
                assert colour[inside].sum() > 0.2 * w * h  # a star fills a quarter of its box
                if thing.colour not in {t.colour for t in scene.things if t != thing}:
                    assert not colour[~inside].any()  # nothing of its colour outside its box
                covered |= inside
            background = pixels[0, 0]
            assert (np.abs(pixels - background).sum(-1)[~covered] < 3).all()  # only background outside the boxes


def test_generated_dataset_has_four_splits_of_well_formed_rows(tmp_path):
    make_tokenizer(tmp_path / "captions" / "tokenizer")
    settings = SynthTaskSettings(tokenizer_from=str(tmp_path / "captions"), train=8, val=4, test=8)
    manifest = build_grounding(tmp_path / "g", settings, progress=False)
    assert {s: v["rows"] for s, v in manifest["splits"].items()} == {"train": 8, "val": 4, "testA": 4, "testB": 4}
    for split in ("testA", "testB"):
        for row in pq.read_table(shard_paths(tmp_path / "g", split)[0]).to_pylist():
            spatial = any(w in row["caption"].split() for w in SPATIAL_WORDS)
            assert spatial == (split == "testB")
            assert row["box"] in row["proposals"] and len(row["proposals"]) in (2, 3)
            x, y, w, h = row["box"]
            assert 0 <= x and x + w <= 64 and 0 <= y and y + h <= 64 and w > 3 and h > 3


# ----------------------------------------------------------------------------- accuracy by hand


def _hand_built_split(tmp_path):
    """Three 40 x 30 images and their expressions (val): the dataset root, config and tokenizer."""
    from albef_ray.data.build.candidates import Candidate, IterableSource
    from albef_ray.data.collate import load_tokenizer

    top_left, bottom_right, whole = [0.0, 0.0, 20.0, 15.0], [20.0, 15.0, 20.0, 15.0], [0.0, 0.0, 40.0, 30.0]
    texts = [
        {"text": "red", "box": top_left, "proposals": [top_left, bottom_right], "ref_id": "0"},
        {"text": "blue", "box": bottom_right, "proposals": [top_left, bottom_right, whole], "ref_id": "1"},
        {"text": "green", "box": whole, "proposals": [], "ref_id": "2"},  # nothing to pick
    ]

    def candidates():
        for i, text in enumerate(texts):
            yield Candidate("hand", f"img{i}", f"img{i}", [text], image=image_bytes(i, size=(40, 30)))

    write_dataset(tmp_path / "ds", [IterableSource("hand", candidates, split="val")], shuffle_seed=None, progress=False)
    cfg = build_config({"task": "grounding", "mlm": {"enabled": False}, "mod": {"mlm": False},
                        "model": {"size": "albef_tiny", "vit_init": None, "bert_init": None}})
    return [str(tmp_path / "ds")], cfg, load_tokenizer(make_tokenizer(tmp_path / "tokenizer"))


def test_accuracies_of_hand_built_expressions(tmp_path, monkeypatch):
    """Three 40 x 30 images; every map peaks on the top-left patch: counts checked by hand."""
    from albef_ray.eval import grounding
    from albef_ray.model.albef import build_model

    paths, cfg, tokenizer = _hand_built_split(tmp_path)
    cam = torch.zeros(4, 4)
    cam[0, 0] = 1.0  # albef_tiny's 4 x 4 patch grid
    monkeypatch.setattr(grounding, "grounding_maps", lambda model, tensors, variants, *a: {
        v: cam.expand(tensors["image"].shape[0], 4, 4) for v in variants})
    metrics, kept = grounding.evaluate_split(build_model("albef_tiny"), paths, "val", cfg, tokenizer, "cpu", keep=3)
    # itm / itc: right on 0 only (on 1 the top-left box beats the whole image: M / 300**0.5 > M / 1200**0.5).
    # random: 1/2 of 0's proposals, 1/3 of 1's (the whole image has IoU 0.25), none of 2's.
    # largest: 0's two boxes tie (the first, right), 1's largest is the whole image (wrong).
    assert metrics["acc_itm"] == metrics["acc_itc"] == pytest.approx(100 / 3)
    assert metrics["acc_random"] == pytest.approx(100 * (1 / 2 + 1 / 3) / 3)
    assert metrics["acc_largest"] == pytest.approx(100 / 3) and metrics["acc_upper"] == pytest.approx(200 / 3)
    assert (metrics["num_refs"], metrics["no_proposals"]) == (3, 1)
    assert [k.ref_id for k in kept] == ["0", "1"] and kept[1].picks == {"itm": 0, "itc": 0}
    assert (kept[0].width, kept[0].height) == (40, 30) and kept[0].correct["itm"]


def test_a_map_function_ranks_the_boxes_through_the_same_scoring(tmp_path):
    """evaluate_split(maps_fn=...): named probe maps, scored exactly as the variants are."""
    from albef_ray.eval import grounding
    from albef_ray.model.albef import build_model

    paths, cfg, tokenizer = _hand_built_split(tmp_path)
    top_left, bottom_right = torch.zeros(4, 4), torch.zeros(4, 4)
    top_left[0, 0] = bottom_right[3, 3] = 1.0
    seen = []

    def maps_fn(model, tensors):
        seen.append(type(model).__name__)
        n = tensors["image"].shape[0]
        return {"tl": top_left.expand(n, 4, 4), "br": bottom_right.expand(n, 4, 4)}

    metrics, kept = grounding.evaluate_split(build_model("albef_tiny"), paths, "val", cfg, tokenizer, "cpu", keep=2,
                                             maps_fn=maps_fn)
    # tl: right on expression 0 only; br: right on 1 only (its own box beats the whole image), wrong on 0.
    assert metrics["acc_tl"] == metrics["acc_br"] == pytest.approx(100 / 3)
    assert kept[0].correct == {"tl": True, "br": False} and kept[1].correct == {"tl": False, "br": True}
    assert kept[1].picks == {"tl": 0, "br": 1}
    assert metrics["acc_random"] == pytest.approx(100 * (1 / 2 + 1 / 3) / 3)
    assert "acc_itm" not in metrics and math.isnan(metrics["grounding_acc"])  # score_variant itm: no such map
    assert seen and set(seen) == {"ALBEF"}


# ----------------------------------------------------------------------------- end to end


def test_train_steps_evaluation_heatmaps_in_mlflow_and_eval_cli(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from albef_ray.cli import main
    from albef_ray.data.collate import load_tokenizer, tokenize
    from albef_ray.data.transforms import normalize
    from albef_ray.eval.grounding import GroundingEvaluator
    from albef_ray.eval.split import load_split
    from albef_ray.tasks import build_task
    from albef_ray.tracking import MetricLogger, open_run
    from albef_ray.train.loop import Schedule, train_step
    from albef_ray.train.optim import build_optimizer

    make_tokenizer(tmp_path / "captions" / "tokenizer")
    build_grounding(tmp_path / "g", SynthTaskSettings(tokenizer_from=str(tmp_path / "captions"), train=16, val=6,
                                                      test=4), progress=False)
    settings = {
        "task": "grounding", "mlm": {"enabled": False}, "mod": {"mlm": False},
        "model": {"size": "albef_tiny", "vit_init": None, "bert_init": None}, "momentum": {"queue_size": 8},
        "train": {"batch_size": 4, "num_workers": 1, "use_gpu": False, "precision": "fp32"},
        "data": {"shards": [str(tmp_path / "g")], "tokenizer": str(tmp_path / "g" / "tokenizer")},
        "eval": {"split": "val"}, "grounding": {"heatmaps": 2},
        "run": {"storage_path": str(tmp_path / "runs")},
    }
    cfg = build_config(settings)
    torch.manual_seed(0)
    task = build_task(cfg)
    split = load_split(cfg.data.shards, "train", cfg)
    ids, mask = tokenize(load_tokenizer(cfg.data.tokenizer), split.captions, cfg.data.max_text_len)
    optimizer = build_optimizer(task, cfg.optim)
    for step in range(3):
        rows = torch.arange(4 * step, 4 * step + 4)
        batch = {"image": normalize(split.images[split.txt2img[rows]]), "input_ids": ids[rows],
                 "attention_mask": mask[rows], "image_idx": split.txt2img[rows]}
        metrics = train_step(task, optimizer, batch, step, cfg, Schedule(3, 3), torch.Generator().manual_seed(step))
        assert np.isfinite(metrics["loss"]) and not metrics["skipped"]

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = open_run(cfg, uri, tmp_path / "run", "grounding-test", {})
    evaluator = GroundingEvaluator(cfg, "cpu", MetricLogger(uri, run_id))
    assert np.isnan(evaluator(task, 3, run=False)["grounding_acc"])
    got = evaluator(task, 3)
    assert got["num_refs"] == 6 and 0 <= got["grounding_acc"] <= 100 and got["acc_upper"] == 100.0
    assert got["grounding_acc"] == got["acc_itm"] and task.training  # evaluated in eval mode, mode restored
    client = MlflowClient(tracking_uri=uri)
    pngs = [a.path for a in client.list_artifacts(run_id, "heatmaps/step_000003")]
    assert len(pngs) == 2 and all(p.endswith(".png") for p in pngs)
    assert client.get_run(run_id).data.metrics["grounding_acc"] == pytest.approx(got["grounding_acc"])

    torch.save({"model": task.state_dict()}, tmp_path / "grounded.pth")
    (tmp_path / "cfg.yaml").write_text(json.dumps(settings))
    assert main(["eval", "grounding", "--config", str(tmp_path / "cfg.yaml"), "--checkpoint",
                 str(tmp_path / "grounded.pth"), "--out", str(tmp_path / "m.json"), "--heatmaps",
                 str(tmp_path / "heat"), "grounding.heatmaps=1"]) == 0
    out = capsys.readouterr().out
    assert "ALBEF_itm" in out and "largest" in out and out.count("\ntest") == 2
    record = json.loads((tmp_path / "m.json").read_text())
    assert set(record["splits"]) == {"val", "testA", "testB"} and record["splits"]["testB"]["num_refs"] == 2
    assert len(list((tmp_path / "heat").glob("*/*.png"))) == 3
    # every split's accuracies went to MLflow (the store under run.storage_path: no training run named)
    store = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    evals = store.search_runs([store.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                              filter_string="tags.kind = 'eval'")
    assert len(evals) == 3 and all(r.info.status == "FINISHED" for r in evals)
    logged = {k: v for r in evals for k, v in r.data.metrics.items()}
    for name in ("val", "testA", "testB"):
        assert logged[f"{name}/acc_itm"] == pytest.approx(record["splits"][name]["acc_itm"])
