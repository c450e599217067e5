"""DDP equivalence: 2 gloo processes x B rows against one process, on CPU, albef_tiny, fp32.

What DDP guarantees here, and what it does not:

* Under DDP each rank runs the task on its local B rows and the gradients are averaged, so
  the step is the gradient of the mean of the ranks' local losses. As in the official code,
  ITC's in-batch columns (the momentum features of the local batch) and ITM's negatives come
  from the local batch; the queue is shared (enqueue all-gathers). So 2 x B and 1 x 2B agree
  exactly only for objectives that are per-row given the negatives: ITM with each row's
  negative inside its own half, and MLM with MoD (with the same number of masked tokens per
  half, since the MLM loss is a mean over masked tokens). ``rowwise`` compares that setting
  with 1 x 2B: same loss, same gradients, same weights, same EMA after the step.
* With ITC on (``full``: ITC + ITM + MLM, MoD alpha = 0.4), the guarantee is per rank: rank r's
  loss is the loss one process computes on rank r's rows from the same state, and the
  all-reduced gradient is the mean of those per-rank gradients. After the step the queue holds
  the momentum features of all 2B rows in rank order, at the same pointer, on every rank,
  and (rows carrying ``image_idx``, some images twice) the index queue their image indices.
* ``rowwise_accum``: the same with 2 micro-batches of B/2 per rank (DDP's ``no_sync`` on the
  first): still exactly 1 x 2B, EMA included, since one optimizer step is one EMA update
  however many micro-batches and ranks make it (an EMA per micro-batch moved the momentum
  encoder twice here, and through MoD the MLM targets, loss and gradients with it).
* Across ranks, gradients, weights, EMA weights, queues and pointer are bit-identical.
* ``nan``: one rank gets a NaN image batch; both ranks skip the step, the weights are unchanged
  and identical, and no NaN reaches the queue on either rank.

All scenarios run in one spawn of 2 workers (tests/distributed_steps.py), each rank writing its
results; the tests compare them with single-process runs of the same ``train_step``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.multiprocessing as mp

from albef_ray.model.albef import build_model
from albef_ray.tasks import build_task
from tests.conftest import make_batch, tiny_cfg
from tests.distributed_steps import ddp_worker, one_step

WORLD, B, T, QUEUE = 2, 4, 10, 32
ALPHA = 0.4
ARCH = build_model("albef_tiny").arch


def _cfg(**sections):
    base = {
        "model": {"text_dropout": 0.0},
        "momentum": {"momentum": 0.9, "queue_size": QUEUE},
        "mod": {"alpha": ALPHA, "alpha_warmup_epochs": 0},
        "train": {"precision": "fp32", "batch_size": B},
    }
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return tiny_cfg(**base)


CONFIGS = {
    "rowwise": _cfg(itc={"enabled": False}, itm={"hard_negatives": False}, mod={"itc": False}),
    "rowwise_accum": _cfg(itc={"enabled": False}, itm={"hard_negatives": False}, mod={"itc": False}),
    "full": _cfg(),
    "nan": _cfg(),
}


def _initial_state(cfg, queue_ptr: int = 0) -> dict[str, torch.Tensor]:
    """Task weights with momentum copies unlike the online ones (so the EMA count shows)."""
    torch.manual_seed(7)
    task = build_task(cfg)
    with torch.no_grad():
        for p in task.momentum.model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        task.momentum.queue_ptr.fill_(queue_ptr)
    return {k: v.clone() for k, v in task.state_dict().items()}


def _fixed_masks(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions 1 ([MASK]) and 3 (a random id) of every row: the same count in every half."""
    masked, labels = ids.clone(), torch.full_like(ids, -100)
    labels[:, [1, 3]] = ids[:, [1, 3]]
    masked[:, 1] = 103
    masked[:, 3] = 500
    return masked, labels


def _rows(batch: dict, lo: int, hi: int, negatives: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Rows lo:hi of a global batch as one micro-batch; ``negatives`` are local indices."""
    masked, labels = batch["mlm_input"]
    return {
        "image": batch["image"][lo:hi], "input_ids": batch["input_ids"][lo:hi],
        "attention_mask": batch["attention_mask"][lo:hi],
        "mlm_input": (masked[lo:hi], labels[lo:hi]), "itm_negatives": negatives,
    }


def _global_batch(seed: int = 0) -> dict:
    image, ids, att = make_batch(ARCH, b=WORLD * B, t=T, seed=seed)
    return {"image": image, "input_ids": ids, "attention_mask": att, "mlm_input": _fixed_masks(ids)}


NEG4 = (torch.tensor([1, 2, 3, 0]), torch.tensor([3, 0, 1, 2]))  # local to 4 rows, never the positive
NEG2 = (torch.tensor([1, 0]), torch.tensor([1, 0]))
# ``full``: two captions of one image on each rank (rows 0 and 2 of rank 0, 1 and 3 of rank 1,
# never each other's NEG4 negative) and image 12 on both ranks.
IMAGE_IDX = torch.tensor([10, 11, 10, 12, 12, 13, 14, 13])


def _scenarios() -> tuple[list[dict], dict]:
    batch = _global_batch()
    per_rank = [_rows(batch, r * B, (r + 1) * B, NEG4) for r in range(WORLD)]
    with_idx = [{**per_rank[r], "image_idx": IMAGE_IDX[r * B:(r + 1) * B]} for r in range(WORLD)]
    halves = [  # each rank: two micro-batches of B/2 rows
        [_rows(batch, r * B + h * 2, r * B + h * 2 + 2, NEG2) for h in range(2)] for r in range(WORLD)
    ]
    nan_batch = _global_batch(seed=1)
    nan_ranks = [
        {k: nan_batch[k][r * B:(r + 1) * B] for k in ("image", "input_ids", "attention_mask")} for r in range(WORLD)
    ]
    nan_ranks[1]["image"] = torch.full_like(nan_ranks[1]["image"], float("nan"))
    states = {
        "rowwise": _initial_state(CONFIGS["rowwise"]),
        "rowwise_accum": _initial_state(CONFIGS["rowwise_accum"]),
        "full": _initial_state(CONFIGS["full"], queue_ptr=16),
        "nan": _initial_state(CONFIGS["nan"], queue_ptr=8),
    }
    micro = {
        "rowwise": [[per_rank[r]] for r in range(WORLD)],
        "rowwise_accum": halves,
        "full": [[with_idx[r]] for r in range(WORLD)],
        "nan": [[nan_ranks[r]] for r in range(WORLD)],  # masks and negatives sampled, as in training
    }
    scenarios = [
        {"name": name, "config": CONFIGS[name].model_dump(mode="json"), "state": states[name],
         "micro": micro[name], "seed": 11}
        for name in CONFIGS
    ]
    return scenarios, {"batch": batch, "per_rank": with_idx, "states": states}


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """One spawn of 2 gloo workers running every scenario; {name: [rank0 result, rank1 result]}."""
    root = tmp_path_factory.mktemp("ddp")
    scenarios, inputs = _scenarios()
    spec = root / "spec.pt"
    torch.save({"scenarios": scenarios}, spec)
    mp.spawn(ddp_worker, args=(WORLD, str(root / "rdzv"), str(spec), str(root)), nprocs=WORLD, join=True)
    results = {}
    for sc in scenarios:
        ranks = [torch.load(root / f"{sc['name']}.rank{r}.pt", weights_only=False) for r in range(WORLD)]
        for r, res in enumerate(ranks):
            if "error" in res:
                ranks = res["error"]  # the test of this scenario fails with the worker's traceback
                break
        results[sc["name"]] = ranks
    return results, inputs


@pytest.fixture(scope="module")
def one_process_2b(ddp_runs):
    """``get(name, local_negatives)``: the 1 x 2B step of a scenario, computed once."""
    cache = {}

    def get(name, local_negatives=NEG4):
        if name not in cache:
            cache[name] = _one_process_2b(ddp_runs[1], name, local_negatives)
        return cache[name]

    return get


def _ranks(ddp_runs, name):
    results, _ = ddp_runs
    ranks = results[name]
    if isinstance(ranks, str):
        pytest.fail(f"scenario {name} raised on a DDP rank:\n{ranks}")
    return ranks


def _single(name: str, state: dict, micro: list[dict]) -> dict:
    """``train_step`` in this process (no process group) from ``state`` on ``micro``."""
    cfg = CONFIGS[name]
    task = build_task(cfg)
    task.load_state_dict(state)
    return one_step(task, cfg, micro)


def _close(ours, theirs, what, rtol=1e-5):
    """Within ``rtol`` of the tensor's scale (max |theirs|), elementwise rtol besides."""
    scale = float(theirs.abs().max()) if theirs.numel() else 0.0
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol * scale + 1e-12, msg=lambda m: f"{what}: {m}")


def _bit_identical_across_ranks(ranks, keys=("grads", "state")):
    for key in keys:
        a, b = ranks[0][key], ranks[1][key]
        assert set(a) == set(b), key
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{key} {name}: {m}")


def _one_process_2b(inputs, name, local_negatives=NEG4):
    """1 x 2B rows in one micro-batch, each row keeping the negative it had in its micro-batch."""
    size = len(local_negatives[0])
    neg = tuple(torch.cat([n + i * size for i in range(WORLD * B // size)]) for n in local_negatives)
    return _single(name, inputs["states"][name], [_rows(inputs["batch"], 0, WORLD * B, neg)])


def _assert_matches_one_process(ranks, single, what):
    for key in ("loss", "itm_loss", "mlm_loss"):
        mean = sum(r["metrics"][key] for r in ranks) / WORLD
        assert mean == pytest.approx(single["metrics"][key], rel=1e-5), f"{what} {key}"
    assert set(ranks[0]["grads"]) == set(single["grads"])
    for name, g in single["grads"].items():
        _close(ranks[0]["grads"][name], g, f"{what} grad {name}")
    for name, v in single["state"].items():  # EMA weights (weights after AdamW's first, sign-like
        if name.startswith("momentum."):      # step are compared across ranks only)
            _close(ranks[0]["state"][name], v, f"{what} EMA {name}")


def test_ddp_rowwise_objectives_match_one_process_of_2b(ddp_runs, one_process_2b):
    """ITM (negatives within each half) + MLM with MoD: 2 x B is exactly 1 x 2B."""
    ranks = _ranks(ddp_runs, "rowwise")
    _bit_identical_across_ranks(ranks)
    assert not any(r["metrics"]["skipped"] for r in ranks)
    assert ranks[0]["metrics"]["alpha"] == ALPHA
    single = one_process_2b("rowwise")
    _assert_matches_one_process(ranks, single, "rowwise")
    # the step did move the weights and the EMA (the comparison above is not of untouched state)
    start = ddp_runs[1]["states"]["rowwise"]
    assert not torch.equal(ranks[0]["state"]["momentum.model.fusion.layers.0.ffn.fc1.weight"],
                           start["momentum.model.fusion.layers.0.ffn.fc1.weight"])
    assert not torch.equal(ranks[0]["state"]["model.itm_head.weight"], start["model.itm_head.weight"])


def test_ddp_grad_accum_gradients_match_one_process_of_2b(ddp_runs, one_process_2b):
    """2 ranks x 2 micro-batches of B/2 (no_sync on the first): the same gradients as 1 x 2B."""
    ranks = _ranks(ddp_runs, "rowwise_accum")
    _bit_identical_across_ranks(ranks)
    single = one_process_2b("rowwise_accum", NEG2)
    for key in ("loss", "itm_loss", "mlm_loss"):
        assert sum(r["metrics"][key] for r in ranks) / WORLD == pytest.approx(single["metrics"][key], rel=1e-5), key
    for name, g in single["grads"].items():
        _close(ranks[0]["grads"][name], g, f"grad {name}")


def test_ddp_grad_accum_ema_matches_one_process_of_2b(ddp_runs, one_process_2b):
    """One optimizer step is one EMA update, however many micro-batches and ranks it has."""
    ranks = _ranks(ddp_runs, "rowwise_accum")
    single = one_process_2b("rowwise_accum", NEG2)
    for name, v in single["state"].items():
        if name.startswith("momentum."):
            _close(ranks[0]["state"][name], v, f"EMA {name}")


def test_ddp_full_step_is_the_mean_of_per_rank_steps(ddp_runs):
    """ITC + ITM + MLM, MoD alpha 0.4: each rank's loss is its local loss, the gradient their mean,
    and the queue gets every rank's momentum features (and image indices) in rank order,
    identically on every rank."""
    ranks = _ranks(ddp_runs, "full")
    _bit_identical_across_ranks(ranks)
    inputs = ddp_runs[1]
    state = inputs["states"]["full"]
    local = [_single("full", copy.deepcopy(state), [inputs["per_rank"][r]]) for r in range(WORLD)]
    for r in range(WORLD):
        for key in ("loss", "itc_loss", "itm_loss", "mlm_loss"):
            assert ranks[r]["metrics"][key] == pytest.approx(local[r]["metrics"][key], rel=1e-5), f"rank {r} {key}"
    assert set(ranks[0]["grads"]) == set(local[0]["grads"])
    for name in local[0]["grads"]:
        _close(ranks[0]["grads"][name], (local[0]["grads"][name] + local[1]["grads"][name]) / 2, f"grad {name}")

    ptr = int(state["momentum.queue_ptr"])
    after = ranks[0]["state"]
    assert int(after["momentum.queue_ptr"]) == (ptr + WORLD * B) % QUEUE
    assert "momentum.index_queue" in after, "no image index queue: image_idx is ignored"
    assert torch.equal(after["momentum.index_queue"][ptr:ptr + WORLD * B], IMAGE_IDX)
    for q in ("image_queue", "text_queue"):
        written = torch.cat([local[r]["state"][f"momentum.{q}"][:, ptr:ptr + B] for r in range(WORLD)], dim=1)
        _close(after[f"momentum.{q}"][:, ptr:ptr + WORLD * B], written, q)
        kept = torch.ones(QUEUE, dtype=torch.bool)
        kept[ptr:ptr + WORLD * B] = False
        assert torch.equal(after[f"momentum.{q}"][:, kept], state[f"momentum.{q}"][:, kept]), q
    for name in after:
        if name.startswith("momentum.model."):
            _close(after[name], local[0]["state"][name], f"EMA {name}")


def test_ddp_nonfinite_batch_on_one_rank_skips_on_both(ddp_runs):
    """Rank 1's NaN images: both ranks skip (the NaN reaches rank 0 through the all-reduce),
    weights unchanged and, like EMA, queues and pointer, bit-identical across ranks."""
    ranks = _ranks(ddp_runs, "nan")
    assert [r["metrics"]["skipped"] for r in ranks] == [1.0, 1.0]
    _bit_identical_across_ranks(ranks, keys=("state",))
    start = ddp_runs[1]["states"]["nan"]
    for name, value in start.items():
        if name.startswith("model."):
            assert torch.equal(ranks[0]["state"][name], value), f"{name} changed on a skipped step"
    for name, value in ranks[0]["state"].items():
        if name.startswith("momentum.model."):
            assert torch.isfinite(value).all(), name


def test_ddp_nonfinite_batch_never_reaches_the_queue(ddp_runs):
    """The step is skipped on both ranks, so neither enqueues (the all-gathered NaN keys of
    rank 1 used to land in both queues and poison ITC for K / global batch steps)."""
    ranks = _ranks(ddp_runs, "nan")
    for r, res in enumerate(ranks):
        for q in ("image_queue", "text_queue"):
            assert torch.isfinite(res["state"][f"momentum.{q}"]).all(), f"rank {r}: NaN in {q}"
