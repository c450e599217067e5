"""Retrieval fine-tuning without Ray: image-id-aware ITC, same-image-free negatives, the task."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from albef_ray.config import ConfigError, build_config
from albef_ray.data.schema import image_indices
from albef_ray.model.albef import build_model
from albef_ray.model.momentum import MomentumEncoder
from albef_ray.objectives.itc import index_positives, itc_loss, itc_targets
from albef_ray.objectives.itm import sample_negatives
from albef_ray.objectives.pretrain import PretrainTask
from albef_ray.tasks import build_task
from albef_ray.objectives.retrieval import RetrievalTask
from albef_ray.train.loop import Schedule, train_step
from albef_ray.train.optim import build_optimizer
from tests.conftest import make_batch

RETRIEVAL = {"task": "retrieval", "mlm": {"enabled": False}, "mod": {"mlm": False}}


def retrieval_cfg(batch_size=4, queue_size=8, **sections):
    data = {
        **RETRIEVAL,
        "model": {"size": "albef_tiny", "vit_init": None, "bert_init": None},
        "momentum": {"queue_size": queue_size},
        "train": {"batch_size": batch_size, "num_workers": 1},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return build_config(data)


# ----------------------------------------------------------------------------- ITC targets


def test_index_targets_by_hand_with_queue():
    # batch: captions 0 and 1 show image 7, caption 2 image 9; queue: image 9, an empty slot, image 7
    index = torch.tensor([7, 7, 9])
    bank = torch.tensor([7, 7, 9, 9, -1, 7])
    t = itc_targets(torch.zeros(3, 6), positives=index_positives(index, bank))
    third, half = 1 / 3, 1 / 2
    expected = torch.tensor([
        [third, third, 0, 0, 0, third],  # both batch captions of image 7 and the queued one
        [third, third, 0, 0, 0, third],
        [0, 0, half, half, 0, 0],
    ])
    torch.testing.assert_close(t, expected)


def test_index_targets_with_distinct_images_are_the_pretraining_one_hot():
    index = torch.tensor([3, 1, 2])
    bank = torch.cat([index, torch.tensor([-1, -1, 5])])
    sim = torch.randn(3, 6)
    torch.testing.assert_close(itc_targets(sim, positives=index_positives(index, bank)), itc_targets(sim))


def test_mod_mixes_momentum_softmax_with_index_targets():
    index, bank = torch.tensor([4, 4]), torch.tensor([4, 4, 8, 4])
    sim_m = torch.randn(2, 4)
    positives = index_positives(index, bank)
    t = itc_targets(torch.zeros(2, 4), sim_m, 0.4, positives)
    hard = torch.tensor([[1 / 3, 1 / 3, 0, 1 / 3]] * 2)
    torch.testing.assert_close(t, 0.4 * sim_m.softmax(1) + 0.6 * hard)
    torch.testing.assert_close(t.sum(1), torch.ones(2))


def test_itc_loss_with_index_targets_by_hand_and_accuracy_counts_any_positive():
    index, bank = torch.tensor([1, 1]), torch.tensor([1, 1, 2])
    positives = index_positives(index, bank)
    sim = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])  # row 0's best is column 1: still a hit
    target = itc_targets(sim, positives=positives)
    out = itc_loss(sim, sim, target, target, positives)
    logp = sim.log_softmax(1)
    expected = -(0.5 * (logp[:, 0] + logp[:, 1])).mean()
    torch.testing.assert_close(out["itc_loss"], expected)
    assert out["itc_acc"].item() == 1.0
    assert itc_loss(sim, sim, target, target)["itc_acc"].item() == 0.0  # diagonal-only accuracy misses both


# ----------------------------------------------------------------------------- ITM negatives


@pytest.mark.parametrize("hard", [True, False])
def test_negatives_never_another_caption_of_the_same_image(hard):
    b = 8
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        index = torch.randint(0, 4, (b,), generator=g)  # ~2 captions per image
        same = index[:, None] == index[None, :]
        if same.all():
            continue
        sim = torch.randn(b, b + 5, generator=g) * 5
        sim[:, :b] += same.float() * 100  # same-image items look most similar: a naive sampler picks them
        neg_image, neg_text = sample_negatives(sim, sim.clone(), b, hard, g, exclude=same)
        rows = torch.arange(b)
        has_other = (~same).any(dim=1)
        assert (index[neg_image] != index)[has_other].all(), seed
        assert (index[neg_text] != index)[has_other].all(), seed
        assert (neg_image != rows).all() and (neg_text != rows).all()


def test_negatives_of_a_one_image_batch_fall_back_off_the_diagonal():
    b = 4
    same = torch.ones(b, b, dtype=torch.bool)
    for sim in (torch.randn(b, b), torch.full((b, b), float("nan"))):
        neg_image, neg_text = sample_negatives(sim, sim, b, True, torch.Generator().manual_seed(0), exclude=same)
        assert (neg_image != torch.arange(b)).all() and (neg_text != torch.arange(b)).all()


def test_hard_negatives_follow_similarity_among_other_images():
    index = torch.tensor([0, 0, 1, 2])
    same = index[:, None] == index[None, :]
    sim = torch.zeros(4, 4)
    sim[0, 1] = 50.0  # same image: excluded although by far the most similar
    sim[0, 3] = 10.0
    counts = torch.zeros(4)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        _, neg_text = sample_negatives(sim, sim.T.contiguous(), 4, True, g, exclude=same)
        counts[neg_text[0]] += 1
    assert counts[1] == 0 and counts[3] > 190


# ----------------------------------------------------------------------------- image index


def test_image_index_is_stable_non_negative_and_source_aware():
    idx = image_indices(["coco", "coco", "flickr", "coco"], ["391895", "522418", "391895", "391895"])
    assert idx.dtype == np.int64 and (idx >= 0).all()
    assert idx[0] == idx[3] and idx[0] != idx[1] and idx[0] != idx[2]
    assert int(idx[0]) == 6925056058501095730  # fixed forever: checkpoints' index queues depend on it
    code = "from albef_ray.data.schema import image_indices; print(int(image_indices(['coco'], ['391895'])[0]))"
    for seed in ("0", "1"):  # not Python's salted hash
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
        assert int(out.stdout) == int(idx[0])


# ----------------------------------------------------------------------------- momentum queue


def test_index_queue_is_optional_and_enqueued_with_the_features():
    model = build_model("albef_tiny")
    plain = MomentumEncoder(model, queue_size=8)
    assert "index_queue" not in plain.state_dict()  # pretraining checkpoints keep their keys
    with pytest.raises(ValueError, match="index"):
        plain.enqueue(torch.randn(4, 256), torch.randn(4, 256), index=torch.arange(4))
    mom = MomentumEncoder(model, queue_size=8, index_queue=True)
    assert mom.index_queue.tolist() == [-1] * 8
    with pytest.raises(ValueError, match="index"):
        mom.enqueue(torch.randn(4, 256), torch.randn(4, 256))
    mom.enqueue(torch.randn(2, 256), torch.randn(2, 256), gather=lambda t: torch.cat([t, t + 10]),
                index=torch.tensor([5, 6]))  # two processes' index tensors gathered like the features
    assert mom.index_queue.tolist() == [5, 6, 15, 16, -1, -1, -1, -1] and int(mom.queue_ptr) == 4


# ----------------------------------------------------------------------------- the task


def _task(cfg):
    torch.manual_seed(0)
    return build_task(cfg)


def test_config_dispatches_and_rejects_pretraining_switches():
    cfg = retrieval_cfg()
    assert isinstance(_task(cfg), RetrievalTask)
    for data, path in [
        ({"task": "retrieval"}, "mlm.enabled"),
        ({**RETRIEVAL, "itc": {"enabled": False}, "itm": {"hard_negatives": False}, "mod": {"itc": False, "mlm": False}},
         "itc.enabled"),
        ({**RETRIEVAL, "itm": {"enabled": False}}, "itm.enabled"),
    ]:
        with pytest.raises(ConfigError) as err:
            build_config(data)
        assert str(err.value).startswith(f"{path}: "), str(err.value)


def test_task_targets_use_the_index_queue():
    cfg = retrieval_cfg(batch_size=4, queue_size=8)
    task = _task(cfg).train()
    task.momentum.index_queue.copy_(torch.tensor([9, -1, 3, -1, -1, 9, -1, -1]))
    ptr_before = int(task.momentum.queue_ptr)
    image, ids, att = make_batch(task.model.arch, b=4)
    idx = torch.tensor([9, 9, 3, 4])
    out = task(image, ids, att, alpha=0.0, image_idx=idx, generator=torch.Generator().manual_seed(0),
               return_outputs=True)
    bank = torch.cat([idx, torch.tensor([9, -1, 3, -1, -1, 9, -1, -1])])
    expected = index_positives(idx, bank).float()
    torch.testing.assert_close(out["target_i2t"], expected / expected.sum(1, keepdim=True))
    torch.testing.assert_close(out["target_t2i"], out["target_i2t"])
    assert out["target_i2t"][0].gt(0).sum() == 4  # batch captions 0, 1 and queue slots 0, 5
    assert (idx[out["neg_image"]] != idx).all() and (idx[out["neg_text"]] != idx).all()
    assert torch.isfinite(out["loss"]) and set(out) >= {"itc_loss", "itm_loss", "itc_acc", "itm_acc"}
    assert "mlm_loss" not in out
    # the batch went into the queue, with its image index
    assert task.momentum.index_queue[ptr_before:ptr_before + 4].tolist() == idx.tolist()


def test_task_distills_with_alpha():
    cfg = retrieval_cfg()
    task = _task(cfg).eval()  # eval: no EMA step and no enqueue, so both calls see the same state
    image, ids, att = make_batch(task.model.arch, b=4)
    idx = torch.tensor([1, 1, 2, 3])
    hard = task(image, ids, att, alpha=0.0, image_idx=idx, return_outputs=True)["target_i2t"]
    soft = task(image, ids, att, alpha=0.4, image_idx=idx, return_outputs=True)["target_i2t"]
    with torch.no_grad():
        m, temp = task.momentum.model, task.model.temp
        m_image = m.image_features(m.encode_image(image))
        text_bank = torch.cat([m.text_features(m.encode_text(ids, att)).T, task.momentum.text_queue], dim=1)
        momentum_softmax = (m_image @ text_bank / temp).softmax(1)
    torch.testing.assert_close(soft, 0.4 * momentum_softmax + 0.6 * hard)
    assert not torch.allclose(hard, soft)


def test_train_steps_with_image_idx_split_into_micro_batches():
    cfg = retrieval_cfg(batch_size=4, optim={"grad_accum": 2, "lr": 1e-3, "warmup_steps": 0})
    task = _task(cfg).train()
    optimizer = build_optimizer(task, cfg.optim)
    image, ids, att = make_batch(task.model.arch, b=4)
    batch = {"image": image, "input_ids": ids, "attention_mask": att, "image_idx": torch.tensor([1, 1, 2, 2])}
    before = task.model.itm_head.weight.detach().clone()
    metrics = train_step(task, optimizer, batch, 0, cfg, Schedule(10, 5), torch.Generator().manual_seed(0))
    assert not metrics["skipped"] and np.isfinite(metrics["loss"]) and "itm_loss" in metrics
    assert not torch.equal(before, task.model.itm_head.weight)
    assert task.momentum.index_queue[:4].tolist() == [1, 1, 2, 2]  # two micro-batches of 2, in order


def test_pretraining_with_distinct_images_is_the_official_step():
    # image_idx only matters where two pairs share an image: all distinct = no index at all
    cfg = retrieval_cfg()
    pretrain_cfg = build_config({"model": cfg.model.model_dump(), "momentum": {"queue_size": 8},
                                 "train": {"batch_size": 4, "num_workers": 1}})
    torch.manual_seed(0)
    task = PretrainTask(build_model("albef_tiny"), pretrain_cfg).eval()
    image, ids, att = make_batch(task.model.arch, b=4)
    a = task(image, ids, att, generator=torch.Generator().manual_seed(1))
    b = task(image, ids, att, generator=torch.Generator().manual_seed(1), image_idx=torch.tensor([3, 1, 4, 0]))
    c = task(image, ids, att, generator=torch.Generator().manual_seed(1), image_idx=torch.tensor([1, 1, 1, 1]))
    torch.testing.assert_close(a["loss"], b["loss"])
    assert not torch.allclose(a["itc_loss"], c["itc_loss"])  # one image: every column of the batch a positive


def test_pretraining_checkpoint_loads_into_a_higher_resolution_retrieval_task(tmp_path):
    from albef_ray.train.checkpoint import STATE_FILE, TrainProgress, save_training_state

    pre_cfg = build_config({"model": {"size": "albef_tiny", "vit_init": None, "bert_init": None},
                            "momentum": {"queue_size": 8}, "train": {"batch_size": 4, "num_workers": 1}})
    torch.manual_seed(0)
    pre = build_task(pre_cfg)  # 32 px: 4 x 4 patches
    save_training_state(tmp_path, pre, build_optimizer(pre, pre_cfg.optim), TrainProgress(), pre_cfg)
    cfg = retrieval_cfg(model={"image_res": 48, "checkpoint": str(tmp_path / STATE_FILE)})  # 6 x 6 patches
    task = build_task(cfg)
    assert task.model.vision.vit.pos_embed.shape[1] == 1 + 36
    assert task.momentum.model.vision.vit.pos_embed.shape[1] == 1 + 36
    torch.testing.assert_close(task.model.text_proj.weight, pre.model.text_proj.weight)
    torch.testing.assert_close(task.momentum.image_queue, pre.momentum.image_queue)
    torch.testing.assert_close(task.model.vision.vit.pos_embed[0, 0], pre.model.vision.vit.pos_embed[0, 0])
    assert task.momentum.index_queue.eq(-1).all()  # pretraining queue entries belong to no image
    image, ids, att = make_batch(task.model.arch, b=4)
    out = task(image, ids, att, image_idx=torch.arange(4))
    assert torch.isfinite(out["loss"])


def test_albef_layout_round_trips_the_index_queue():
    from albef_ray.model.adapters import albef_to_native, native_to_albef

    task = _task(retrieval_cfg())
    task.momentum.index_queue.copy_(torch.arange(8))
    state = task.state_dict()
    official = native_to_albef(state, task.model.arch.text_layers, finetuned=True)
    assert official["idx_queue"].shape == (1, 8)
    back, unused = albef_to_native(official, task.model.arch.text_layers)
    assert back["momentum.index_queue"].tolist() == list(range(8)) and "idx_queue" not in unused


# ----------------------------------------------------------------------------- data path


def test_transform_and_collate_carry_the_image_index(tmp_path):
    from albef_ray.data.collate import CaptionCollator
    from albef_ray.data.transforms import AugmentSpec, transform_batch
    from tests.data.shard_fixtures import CORRUPT, encode, make_tokenizer, solid

    rows = {
        "image": np.array([encode(solid(10)), CORRUPT, encode(solid(90)), encode(solid(130))], dtype=object),
        "caption": np.array(["a red circle", "junk", "a blue square", "the red circle"], dtype=object),
        "image_id": np.array(["1", "2", "3", "1"], dtype=object),
        "source": np.array(["coco", "coco", "coco", "coco"], dtype=object),
    }
    out = transform_batch(rows, AugmentSpec(16, randaug_ops=0), True, 30, torch.Generator().manual_seed(0))
    expected = dict(zip(["1", "3"], image_indices(["coco", "coco"], ["1", "3"]).tolist()))
    assert out["image_idx"].dtype == np.int64
    assert [expected[i] for i in out["image_id"]] == out["image_idx"].tolist()  # aligned after the shuffle
    batch = CaptionCollator(make_tokenizer(tmp_path / "tok"), 25)(out)
    assert batch["image_idx"].dtype == torch.int64 and batch["image_idx"].tolist() == out["image_idx"].tolist()
    assert all(isinstance(v, torch.Tensor) for v in batch.values())
