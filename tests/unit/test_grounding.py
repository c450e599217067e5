"""Grounding without Ray: box scoring and IoU by hand, Grad-CAM maps over every size, the task,
the official checkpoint layout, the config checks."""

import math

import pytest
import torch

from albef_ray.config import ConfigError, build_config
from albef_ray.eval.grounding import (
    box_iou,
    box_scores,
    grounding_maps,
    largest_box,
    pick_box,
    upsample_map,
)
from albef_ray.model.adapters import native_to_albef
from albef_ray.model.albef import build_model
from albef_ray.model.loading import load_albef_checkpoint
from albef_ray.objectives.grounding import GroundingTask
from albef_ray.objectives.retrieval import RetrievalTask
from albef_ray.tasks import build_task, get_task
from tests.conftest import ALL_SIZES, make_batch

GROUNDING = {"task": "grounding", "mlm": {"enabled": False}, "mod": {"mlm": False}}


def grounding_cfg(**sections):
    data = {**GROUNDING, "model": {"size": "albef_tiny", "vit_init": None, "bert_init": None},
            "momentum": {"queue_size": 8}, "train": {"batch_size": 4, "num_workers": 1}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return build_config(data)


# ----------------------------------------------------------------------------- box scores and IoU by hand


def test_box_scores_sum_inside_over_area_to_the_alpha():
    heat = torch.arange(24, dtype=torch.float32).reshape(4, 6)  # heat[y, x] = 6 y + x
    boxes = torch.tensor([
        [0.0, 0.0, 2.0, 2.0],  # rows 0-1, cols 0-1: 0 + 1 + 6 + 7 = 14
        [1.5, 1.2, 2.0, 1.9],  # the official int() slice: rows int(1.2)=1 : int(3.1)=3, cols 1 : int(3.5)=3
        [4.0, 2.0, 5.0, 5.0],  # runs off the image: rows 2-3, cols 4-5 (clipped), area still 25
        [3.0, 1.0, 0.0, 2.0],  # zero area
    ])
    inside = [14.0, 7 + 8 + 13 + 14, 16 + 17 + 22 + 23, 0.0]
    areas = [4.0, 2.0 * 1.9, 25.0]
    for alpha in (0.0, 0.5, 1.0):
        got = box_scores(heat, boxes, alpha)
        want = [s / a**alpha for s, a in zip(inside, areas)]
        torch.testing.assert_close(got[:3], torch.tensor(want, dtype=torch.float64))
        assert got[3] == -math.inf


def test_alpha_trades_peak_against_mass():
    heat = torch.zeros(10, 10)
    heat[2, 2] = 5.0  # a sharp peak of mass 5 ...
    heat[5:10, 5:10] = 1.0  # ... and a plateau of mass 25
    boxes = torch.tensor([[2.0, 2.0, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
    assert int(torch.argmax(box_scores(heat, boxes, alpha=1.0))) == 0  # mean: 5 vs 1
    assert int(torch.argmax(box_scores(heat, boxes, alpha=0.0))) == 1  # sum: 5 vs 25
    # The official alpha 0.5: 5 / 1 and 25 / 5 tie; the first of equal scores wins.
    torch.testing.assert_close(box_scores(heat, boxes, 0.5), torch.tensor([5.0, 5.0], dtype=torch.float64))
    assert int(torch.argmax(box_scores(heat, boxes, 0.5))) == 0


def test_iou_is_the_official_inclusive_pixel_one():
    assert box_iou([10, 10, 20, 20], [10, 10, 20, 20]) == 1.0
    # Half of b's width overlaps: inclusive corners 10..29 and 20..39 share columns 20..29 (10 px).
    assert box_iou([10, 10, 20, 20], [20, 10, 20, 20]) == pytest.approx(200 / (400 + 400 - 200))
    assert box_iou([0, 0, 10, 10], [10, 0, 10, 10]) == 0.0  # touching: no shared pixel
    assert box_iou([0, 0, 10, 10], [9, 0, 10, 10]) == 0.0  # one shared column: the official strict < says none
    assert box_iou([0, 0, 10, 10], [50, 50, 5, 5]) == 0.0
    # A box inside another: the inner one's area over the outer one's.
    assert box_iou([0, 0, 10, 10], [2, 2, 5, 5]) == pytest.approx(25 / 100)
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 5]) >= 0.5  # exactly half: correct at the threshold


def test_pick_box_follows_the_upsampled_map_and_largest_box():
    cam = torch.zeros(4, 4)
    cam[0, 3] = 1.0  # top-right patch of a 4 x 4 grid
    proposals = torch.tensor([[0.0, 0.0, 20.0, 20.0], [60.0, 0.0, 20.0, 20.0], [0.0, 60.0, 20.0, 20.0]])
    assert pick_box(cam, proposals, height=80, width=80) == 1
    assert pick_box(cam.T.contiguous(), proposals, height=80, width=80) == 2  # bottom-left
    assert upsample_map(cam, 80, 60).shape == (80, 60)
    assert largest_box(torch.tensor([[0, 0, 3, 3], [0, 0, 2, 5], [1, 1, 5, 1]], dtype=torch.float64)) == 1


# ----------------------------------------------------------------------------- maps, task, checkpoint, config


@pytest.mark.parametrize("size", ALL_SIZES)
def test_grounding_maps_cover_the_patch_grid_of_every_size(size):
    model = build_model(size).eval()
    image, ids, mask = make_batch(model.arch, b=2, t=6)
    cfg = build_config({**GROUNDING, "model": {"size": size, "vit_init": None, "bert_init": None}})
    maps = grounding_maps(model, {"image": image, "input_ids": ids, "attention_mask": mask}, ("itm", "itc"), cfg,
                          torch.device("cpu"))
    grid = model.arch.image_res // model.arch.patch_size
    for variant in ("itm", "itc"):
        assert maps[variant].shape == (2, grid, grid) and torch.isfinite(maps[variant]).all()
    assert all(p.grad is None for p in model.parameters())  # gradients of the attention only


def test_grounding_task_is_the_retrieval_objective():
    cfg = grounding_cfg()
    assert get_task("grounding").task_class() is GroundingTask and GroundingTask.batch_keys == ("image_idx",)
    torch.manual_seed(0)
    grounding = build_task(cfg).train()
    retrieval = RetrievalTask(build_model("albef_tiny"), cfg).train()
    retrieval.load_state_dict(grounding.state_dict())
    image, ids, mask = make_batch(grounding.model.arch, b=4, t=6)
    image_idx = torch.tensor([3, 3, 5, 7])  # two expressions of one image: ITC positives of each other
    outs = []
    for task in (grounding, retrieval):
        torch.manual_seed(1)  # the same dropout
        outs.append(task(image, ids, mask, alpha=0.4, generator=torch.Generator().manual_seed(0), image_idx=image_idx))
    assert {"loss", "itc_loss", "itm_loss", "itc_acc", "itm_acc"} <= set(outs[0])
    torch.testing.assert_close(outs[0]["loss"], outs[0]["itc_loss"] + outs[0]["itm_loss"])
    for key in ("loss", "itc_loss", "itm_loss"):
        assert torch.isfinite(outs[0][key])
        torch.testing.assert_close(outs[0][key], outs[1][key])
    with pytest.raises(ValueError, match="image_idx"):
        grounding(image, ids, mask)


def test_official_grounding_checkpoint_loads_with_no_missing_or_unused_key(tmp_path):
    """The official Grounding.py model is model_retrieval.py's: its state dict (queues, idx_queue) maps whole."""
    cfg = grounding_cfg()
    src = GroundingTask(build_model("albef_tiny"), cfg)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
        src.momentum.index_queue.copy_(torch.arange(8))
    official = native_to_albef(src.state_dict(), src.model.arch.text_layers)
    assert {"idx_queue", "image_queue", "visual_encoder_m.pos_embed", "itm_head.weight"} <= set(official)
    torch.save({"model": official}, tmp_path / "refcoco.pth")
    dst = GroundingTask(build_model("albef_tiny"), cfg)
    report = load_albef_checkpoint(dst, str(tmp_path / "refcoco.pth"))
    assert not report.missing and not report.unused, str(report)
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key


def test_config_checks_of_the_grounding_task():
    cfg = grounding_cfg()
    assert cfg.grounding.variants == ["itm", "itc"] and cfg.grounding.box_alpha == 0.5
    with pytest.raises(ConfigError, match="mlm.enabled: grounding fine-tuning has no MLM"):
        build_config({"task": "grounding", "mod": {"mlm": False}})
    with pytest.raises(ConfigError, match="grounding.score_variant"):
        build_config({**GROUNDING, "grounding": {"variants": ["itc"]}})
    with pytest.raises(ConfigError, match="grounding.variants"):
        build_config({**GROUNDING, "grounding": {"variants": ["gradient"]}})
