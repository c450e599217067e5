"""Ray Train edge: a config becomes a TorchTrainer run of ALBEF pretraining.

The worker loop only wires plain-PyTorch pieces together (``build_task``, ``train_step``,
``save_training_state``) with Ray's: the dataset shard, DDP via ``prepare_model``,
``ray.train.report`` for metrics and checkpoints, and ``get_checkpoint`` for restarts.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import AlbefConfig, ConfigError, build_config
from ..model.weights_file import read_weights_file
from ..tasks import build_task, get_task
from ..tracking import MetricLogger, close_run, open_run, resolve_tracking_uri, ui_hint
from ..train.checkpoint import (
    STATE_FILE,
    TrainProgress,
    load_training_state,
    rng_state,
    save_training_state,
    set_rng_state,
)
from ..train.loop import Schedule, format_metrics, train_step
from ..train.metrics import MetricWindow, NonFiniteRun
from ..train.optim import build_optimizer
from .common import absolute_data_paths, init_ray, run_paths
from .faults import maybe_inject_fault

log = logging.getLogger(__name__)
RNG_FILE = "rng_rank{rank}.pt"
STREAM_FILE = "stream_rank{rank}.json"  # a worker's place in its epoch's data stream
STAGE_FILE = "stage.json"  # which stage of a chained run wrote the checkpoint, finished or not, and its evaluations
# A chained run's retention score: a stage's final checkpoint outranks every other, then newer beats older.
CHAIN_RANK = "chain_rank"


def chain_rank(stage: int, step: int, final: bool) -> float:
    """:data:`CHAIN_RANK` of a chained run's checkpoint (higher is kept first)."""
    return 1e12 + stage if final else stage * 1e9 + step


@dataclass
class _Stage:
    """A stage of a chained run (:func:`chain_loop_per_worker`) as its training loop sees it.

    ``evaluate(cfg, weights) -> metrics`` runs on rank 0 on the stage's final weights; the
    metrics are reported prefixed ``<prefix>/``, logged to the run's MLflow run and collected
    in ``evals`` (every earlier stage's too), which each checkpoint's ``stage.json`` carries.
    ``keep_final``: a local folder where every rank keeps the final weights for the next stage.
    ``chained``: checkpoints carry ``chain_rank`` (:data:`CHAIN_RANK`), by which Ray keeps each
    stage's final checkpoint besides the latest ones.
    """

    index: int = 0
    evaluate: object = None
    prefix: str = ""
    evals: dict = field(default_factory=dict)
    keep_final: str | None = None
    tracking_uri: str | None = None
    run_id: str | None = None
    run_dir: str = ""
    chained: bool = False

    def finish(self, cfg: AlbefConfig, weights: Path, step: int) -> dict:
        """Evaluate the stage's final ``weights`` (rank 0); the metrics to report, prefixed."""
        if self.evaluate is None:
            return {}
        metrics = {k: float(v) for k, v in self.evaluate(cfg, str(weights)).items()}
        if self.run_id:
            from ..eval.tracking import log_retrieval

            tracked = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"tracking_uri": self.tracking_uri})})
            where = f"{self.run_dir}: the checkpoint of step {step}, the end of stage {self.index}"
            log_retrieval(tracked, metrics, where, run_id=self.run_id, step=step, prefix=self.prefix)
        self.evals[self.prefix] = metrics
        return {f"{self.prefix}/{k}": v for k, v in metrics.items()}


def read_stage_marker(directory: str | Path | None) -> dict:
    """A checkpoint's ``stage.json``: ``{"stage", "finished", "evals"}`` (stage 0 unfinished when absent)."""
    path = Path(directory) / STAGE_FILE if directory is not None else None
    if path is None or not path.is_file():
        return {"stage": 0, "finished": False, "evals": {}}
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- worker side


def _report(metrics, progress, cfg, task, optimizer, generator, rank, with_checkpoint, position=0, world=1,
            stage=None, final=False):
    """``ray.train.report`` of ``metrics``, with a checkpoint when ``with_checkpoint``.

    ``stage`` (a :class:`_Stage`; None: a run of one stage) is written into the checkpoint
    (``stage.json``); at a stage's ``final`` checkpoint rank 0 first evaluates the weights it
    just wrote with the stage's evaluation, logs and reports the result, and every rank keeps a
    copy of the weights for the next stage.
    """
    import ray.train

    metrics = {**metrics, "step": progress.step, "epoch": progress.epoch}
    if not with_checkpoint:
        ray.train.report(metrics)
        return
    stage = stage or _Stage()
    if stage.chained:
        metrics[CHAIN_RANK] = chain_rank(stage.index, progress.step, final)
    with tempfile.TemporaryDirectory() as tmp:
        # Every rank writes its own RNG file; Ray merges the ranks' files into one checkpoint.
        if rank == 0:
            save_training_state(tmp, task, optimizer, progress, cfg, generator)
            if final:
                metrics.update(stage.finish(cfg, Path(tmp) / STATE_FILE, progress.step))
            marker = {"stage": stage.index, "finished": final, "step": progress.step, "evals": stage.evals}
            (Path(tmp) / STAGE_FILE).write_text(json.dumps(marker))
        if final and stage.keep_final:
            keep = Path(stage.keep_final)
            if rank == 0:
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(Path(tmp) / STATE_FILE, keep / STATE_FILE)
            else:
                save_training_state(keep, task, optimizer, progress, cfg, generator)
        torch.save(rng_state(generator), Path(tmp) / RNG_FILE.format(rank=rank))
        stream = {"epoch": progress.epoch, "position": position, "world": world}
        (Path(tmp) / STREAM_FILE.format(rank=rank)).write_text(json.dumps(stream))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _stream_position(directory: Path, rank: int, world: int, progress: TrainProgress, batch_size: int) -> int:
    """Where rank ``rank`` continues its epoch's stream: the row after its last trained one.

    Exact when the checkpoint was written by as many workers; otherwise (or for a checkpoint
    without stream files) an estimate, with a warning: rows near it may be trained twice or not.
    """
    if progress.batches_done == 0:
        return 0
    saved = {}
    for path in directory.glob(STREAM_FILE.format(rank="*")):
        state = json.loads(path.read_text())
        if state["epoch"] == progress.epoch:
            saved[path.name] = state
    mine = saved.get(STREAM_FILE.format(rank=rank))
    if mine is not None and mine["world"] == world:
        return int(mine["position"])
    estimate = sum(s["position"] for s in saved.values()) // world if saved else progress.batches_done * batch_size
    log.warning(
        "rank %d: the checkpoint holds no data position for %d workers; continuing epoch %d at row %d "
        "of this worker's stream (an estimate: rows near it may be trained twice or skipped)",
        rank, world, progress.epoch, estimate,
    )
    return estimate


def _restore(ckpt, task, optimizer, generator, rank, world, batch_size) -> tuple[TrainProgress, int]:
    if ckpt is None:
        return TrainProgress(), 0
    with ckpt.as_directory() as d:
        progress = load_training_state(d, task, optimizer, generator, restore_rng=False)
        position = _stream_position(Path(d), rank, world, progress, batch_size)
        rng_path = Path(d) / RNG_FILE.format(rank=rank)
        if rng_path.exists():
            set_rng_state(read_weights_file(rng_path), generator)
    log.info("rank %d resumed at step %d (epoch %d, batch %d, stream row %d)", rank, progress.step, progress.epoch,
             progress.batches_done, position)
    return progress, position


def _host_group():
    """A process group for host-side agreement: the default one when it runs on the CPU
    (gloo), else a gloo group beside NCCL, so agreeing on a flag never waits for the GPU."""
    import torch.distributed as dist

    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def _agreed(batches, world: int, group=None):
    """The batches while every rank has one: when any rank's stream runs out, the epoch ends on all.

    Undecodable rows are dropped per worker, so workers' streams end after different numbers
    of full batches; one more step on some ranks only would hang DDP's collectives. The flag
    is a CPU tensor reduced over ``group`` (:func:`_host_group`): no GPU sync.
    """
    import torch.distributed as dist

    batches = iter(batches)
    while True:
        batch = next(batches, None)
        if world > 1:
            have = torch.tensor([0 if batch is None else 1])
            dist.all_reduce(have, op=dist.ReduceOp.MIN, group=group)
            if not int(have.item()):
                return
        elif batch is None:
            return
        yield batch


def train_loop_per_worker(loop_config: dict) -> dict:
    """Runs on every Ray Train worker. ``loop_config``: config, steps_per_epoch, run_dir, tracking."""
    import ray.train

    return _train_stage(loop_config, ray.train.get_checkpoint())


def _train_stage(loop_config: dict, checkpoint, stage: _Stage | None = None) -> dict:
    """One training run of ``loop_config`` on this worker, continued from ``checkpoint`` if any."""
    import ray.train
    import ray.train.torch

    from ..objectives.mlm import SpecialTokens

    cfg = build_config(loop_config["config"])
    # Ray sets OMP_NUM_THREADS=1 in workers; use the CPUs this worker reserved.
    torch.set_num_threads(max(1, round(cfg.train.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir = Path(loop_config["run_dir"])
    torch.manual_seed(cfg.seed)  # identical init on every rank
    task = build_task(cfg, loop_config.get("special") or SpecialTokens())
    all_on = cfg.itc.enabled and cfg.itm.enabled and cfg.mlm.enabled
    task = ray.train.torch.prepare_model(
        task, parallel_strategy_kwargs={"find_unused_parameters": not all_on, "forward_sync_buffers": False}
    )
    device = ray.train.torch.get_device()
    optimizer = build_optimizer(task, cfg.optim)
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 1000 * rank)
    torch.manual_seed(cfg.seed + 1000 * rank)  # dropout differs across ranks
    progress, position = _restore(checkpoint, task, optimizer, generator, rank, world, cfg.train.batch_size)
    start_step = progress.step
    schedule = Schedule(cfg.train.epochs * loop_config["steps_per_epoch"], loop_config["steps_per_epoch"])
    stop = min(schedule.total_steps, cfg.train.max_steps or schedule.total_steps)
    tracker = MetricLogger(loop_config["tracking_uri"], loop_config["run_id"], cfg.tracking.metric_prefix) if rank == 0 and loop_config.get("run_id") else None
    # Fine-tuning tasks with an epoch evaluator (retrieval): rank 0 evaluates at epoch ends;
    # the other ranks wait in report.
    evaluator = get_task(cfg.task).make_epoch_evaluator(cfg, device, tracker) if rank == 0 else None
    stream = loop_config.get("stream")  # caption shards: a deterministic order per (seed, epoch)
    shard = None if stream is not None else ray.train.get_dataset_shard("train")
    window = MetricWindow()
    bad_steps = NonFiniteRun(progress.nonfinite_in_row)
    group = _host_group() if world > 1 else None
    last_rows = None  # the last batch's stream positions, read (a sync) at the next flush
    clock = {"start": time.perf_counter(), "wait": 0.0, "steps": 0}
    task.train()

    def epoch_batches():
        if stream is not None:  # starts at `position`: nothing before it is read or decoded
            return stream.epoch_batches(progress.epoch, rank, world, position, cfg.train.batch_size, device)
        # Generated tensors: the same rows every epoch, nothing to decode; skip what was trained.
        kwargs = loop_config.get("iter_kwargs") or {"batch_size": cfg.train.batch_size, "drop_last": True}
        batches = shard.iter_torch_batches(collate_fn=loop_config.get("collate"), device=device, **kwargs)
        return itertools.islice(batches, progress.batches_done, None)

    def flush(checkpoint: bool, evaluate: bool, final: bool = False) -> None:
        # Steps run ahead of the device; their metrics, stream position and verdicts are read
        # here, in one sync per logging interval.
        nonlocal position, last_rows
        report = window.flush()
        if last_rows is not None:
            position, last_rows = int(last_rows.max()) + 1, None
        progress.nonfinite_in_row, worst = bad_steps.read()
        if worst >= cfg.train.max_nonfinite_steps:  # before any checkpoint of these steps
            raise RuntimeError(
                f"{worst} non-finite steps in a row by step {progress.step} "
                f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); the last good "
                "checkpoint is kept. Lower optim.lr, set optim.grad_clip or check the data."
            )
        elapsed = time.perf_counter() - clock["start"]  # the window's wall time, device work included
        if report and clock["steps"]:
            report.update(
                step_time_s=elapsed / clock["steps"],
                samples_per_s=cfg.train.batch_size * world * clock["steps"] / max(elapsed, 1e-9),
                data_wait_frac=clock["wait"] / max(elapsed, 1e-9),
            )
        if tracker is not None and report:
            tracker.log(report, progress.step)
            log.info(format_metrics(progress.step, stop, report))
        if evaluator is not None and checkpoint:
            report.update(evaluator(task, progress.step, run=evaluate))
        _report(report, progress, cfg, task, optimizer, generator, rank, checkpoint, position, world, stage, final)
        clock.update(start=time.perf_counter(), wait=0.0, steps=0)

    while progress.epoch < cfg.train.epochs and progress.step < stop:
        epoch_done = True  # by steps_per_epoch or by a stream running out; False: stopped at `stop`
        t_wait = time.perf_counter()
        for batch in _agreed(epoch_batches(), world, group):
            clock["wait"] += time.perf_counter() - t_wait
            maybe_inject_fault(cfg, progress.step, rank, world, run_dir)
            dropped = batch.pop("num_dropped", None) if isinstance(batch, dict) else None
            rows = batch.pop("position", None) if isinstance(batch, dict) else None
            metrics = train_step(task, optimizer, batch, progress.step, cfg, schedule, generator, sync=False)
            progress.step += 1
            progress.batches_done += 1
            clock["steps"] += 1
            last_rows = rows if rows is not None else last_rows
            bad_steps.add(metrics["skipped"])
            metrics["dropped_rows"] = dropped.sum() if dropped is not None else 0.0
            window.add(metrics)
            if progress.batches_done >= schedule.steps_per_epoch:
                break
            if progress.step >= stop:
                epoch_done = False
                break
            checkpoint = progress.step % cfg.train.checkpoint_every_steps == 0
            if checkpoint or progress.step % cfg.train.log_every_steps == 0:
                flush(checkpoint, evaluate=False)
            t_wait = time.perf_counter()
        # However the epoch ended, it ends here: checkpoint, report, evaluation.
        if epoch_done:
            last_rows = None  # the next epoch's stream starts at row 0
            progress.epoch += 1
            progress.batches_done = 0
            position = 0
        flush(checkpoint=True, evaluate=True, final=not (progress.epoch < cfg.train.epochs and progress.step < stop))
    return {"step": progress.step, "epoch": progress.epoch, "start_step": start_step}


def chain_loop_per_worker(loop_config: dict) -> dict:
    """Runs on every Ray Train worker: the stages of ``loop_config["stages"]`` one after another.

    Each stage is a :func:`train_loop_per_worker` config plus ``evaluate`` (``(cfg, weights)
    -> metrics`` or None) and ``prefix``; stage i > 0 starts from stage i-1's final weights
    (its ``model.checkpoint``), so a trial's pretraining and fine-tuning share one worker
    group: one start-up instead of one per stage. A restart continues in the stage of the last
    checkpoint (``stage.json``): a finished stage is neither trained nor evaluated again.
    """
    import ray.train

    stages = loop_config["stages"]
    checkpoint = ray.train.get_checkpoint()
    marker = {"stage": 0, "finished": False, "evals": {}}
    evals: dict = {}
    result: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        previous = None  # the last finished stage's final weights (state.pt), on this worker
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                marker = read_stage_marker(d)
                evals = dict(marker["evals"])
                if marker["finished"]:  # the next stage starts from these weights
                    previous = Path(scratch) / f"stage{marker['stage']}" / STATE_FILE
                    previous.parent.mkdir(parents=True)
                    shutil.copy(Path(d) / STATE_FILE, previous)
        for index, stage_config in enumerate(stages):
            if index < marker["stage"] or (index == marker["stage"] and marker["finished"]):
                continue  # finished before the restart
            resume = checkpoint if checkpoint is not None and index == marker["stage"] else None
            stage_config = dict(stage_config)
            if index > 0 and resume is None:
                cfg = build_config(stage_config["config"])
                stage_config["config"] = cfg.model_copy(
                    update={"model": cfg.model.model_copy(update={"checkpoint": str(previous)})}
                ).model_dump(mode="json")
            stage = _Stage(
                index, stage_config.get("evaluate"), stage_config.get("prefix", ""), evals,
                str(Path(scratch) / f"stage{index}"), stage_config.get("tracking_uri"), stage_config.get("run_id"),
                stage_config.get("run_dir", ""), chained=True,
            )
            result = _train_stage(stage_config, resume, stage)
            previous = Path(stage.keep_final) / STATE_FILE
    return {**result, "evals": evals}


# --------------------------------------------------------------------------- driver side


def checkpoint_config(cfg: AlbefConfig):
    """Ray's retention: the last ``train.keep_checkpoints``, or, when the task evaluates every
    epoch, the best ones by its ``score`` (Ray always keeps the latest too, for restarts)."""
    import ray.train

    spec = get_task(cfg.task)
    if spec.evaluates_every_epoch(cfg) and spec.score:
        return ray.train.CheckpointConfig(
            num_to_keep=cfg.train.keep_checkpoints, checkpoint_score_attribute=spec.score,
            checkpoint_score_order="max",
        )
    return ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)


def best_checkpoint(result, score: str) -> tuple[str, dict] | None:
    """(path, metrics) of the reported checkpoint with the highest finite ``score``, if any.

    Checkpoints written between evaluations report ``score = NaN``; they are never the best.
    """
    scored = [
        (ckpt.path, metrics) for ckpt, metrics in (result.best_checkpoints or [])
        if isinstance(metrics.get(score), (int, float)) and math.isfinite(metrics[score])
    ]
    return max(scored, key=lambda item: item[1][score]) if scored else None



def _loop_config(cfg, paths, uri, run_id, steps_per_epoch, collate, special, iter_kwargs, stream) -> dict:
    """The :func:`train_loop_per_worker` config of one training run (one stage of a chain)."""
    return {
        "config": cfg.model_dump(mode="json"), "steps_per_epoch": steps_per_epoch,
        "run_dir": str(paths.run_dir), "tracking_uri": uri, "run_id": run_id,
        "collate": collate, "special": special, "iter_kwargs": iter_kwargs, "stream": stream,
    }


def _trainer(loop, loop_config: dict, cfg: AlbefConfig, paths, checkpoints, callbacks, datasets=None):
    """A TorchTrainer of ``loop`` with ``cfg``'s scaling and failure settings, stored under ``paths``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=paths.name, storage_path=str(paths.storage), checkpoint_config=checkpoints,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets or None,
    )


def launch_pretrain(
    cfg: AlbefConfig, datasets: dict, steps_per_epoch: int, collate=None, special=None, iter_kwargs=None, callbacks=None
):
    """Fit a TorchTrainer for ``cfg``; returns (ray.train.Result, RunPaths, tracking uri, run id).

    ``datasets["train"]`` is a :class:`~albef_ray.launch.data.ShardStream` (each worker reads
    its own part of the epoch's order) or a Ray Dataset (split by Ray Train).
    ``callbacks`` go to the Train ``RunConfig`` (a Tune sweep passes ``TuneReportCallback``).
    """
    from .data import ShardStream

    stream = datasets.get("train") if isinstance(datasets.get("train"), ShardStream) else None
    datasets = {k: v for k, v in datasets.items() if not isinstance(v, ShardStream)}
    paths = run_paths(cfg)
    uri = resolve_tracking_uri(cfg, paths.storage)
    run_id = None
    if cfg.tracking.enabled:
        tags = {"model.size": cfg.model.size, "dataset": ",".join(cfg.data.shards) or "synthetic", **cfg.tracking.tags}
        run_id = open_run(cfg, uri, paths.run_dir, paths.name, tags)
    trainer = _trainer(
        train_loop_per_worker,
        _loop_config(cfg, paths, uri, run_id, steps_per_epoch, collate, special, iter_kwargs, stream),
        cfg, paths, checkpoint_config(cfg), callbacks, datasets,
    )
    status = "FAILED"
    result = None
    try:
        result = trainer.fit()
        status = "FINISHED"
        return result, paths, uri, run_id
    finally:
        if run_id:
            ckpt = result.checkpoint.path if result is not None and result.checkpoint else None
            close_run(uri, run_id, status, ckpt, paths.run_dir)


def chainable(cfgs: list[AlbefConfig]) -> bool:
    """Whether these runs can share one worker group (:func:`launch_chain`): all stream caption
    shards, on equally many workers with equal resources."""
    def scaling(c):
        return c.train.num_workers, c.train.use_gpu, c.train.cpus_per_worker

    return all(c.data.shards for c in cfgs) and len({scaling(c) for c in cfgs}) == 1


def launch_chain(stages: list[tuple[AlbefConfig, object, str]], run_id: str | None = None, callbacks=None):
    """Fit one TorchTrainer that trains ``stages`` in turn (:func:`chain_loop_per_worker`).

    Each stage is ``(cfg, evaluate, prefix)``: its config (``run.name`` of the first names the
    Train run; data must be caption shards, scaling equal: :func:`chainable`), the evaluation
    of its final weights (``(cfg, weights) -> metrics``, None: none) and the prefix its metrics
    are reported and logged under (the first stage's training metrics keep theirs,
    ``tracking.metric_prefix``). All stages log into the MLflow run ``run_id``.

    Returns:
        ``(ray.train.Result, evals, finals)``: evals maps each evaluated stage's prefix to its
        metrics, read back from the last checkpoint (so a resumed or already finished run has
        them too); finals maps each stage's index to ``(its final checkpoint, its step)``
        (:func:`stage_checkpoints`).
    """
    import ray.train

    cfgs = [cfg for cfg, _, _ in stages]
    if not chainable(cfgs):
        raise ConfigError("a chained run needs caption shards (data.shards) and the same train.num_workers, "
                          "train.use_gpu and train.cpus_per_worker in every stage")
    first = cfgs[0]
    paths = run_paths(first)
    uri = resolve_tracking_uri(first, paths.storage)
    loop_stages = []
    for cfg, evaluate, prefix in stages:
        datasets, steps_per_epoch, collate, special, loader_kwargs = train_inputs(cfg)
        stage = _loop_config(cfg, paths, uri, run_id, steps_per_epoch, collate, special, loader_kwargs, datasets["train"])
        loop_stages.append({**stage, "evaluate": evaluate, "prefix": prefix})
    # Each stage's final checkpoint and the last ones (a stage's best-by-score is not kept apart).
    checkpoints = ray.train.CheckpointConfig(
        num_to_keep=len(cfgs) + max(c.train.keep_checkpoints for c in cfgs),
        checkpoint_score_attribute=CHAIN_RANK, checkpoint_score_order="max",
    )
    trainer = _trainer(chain_loop_per_worker, {"stages": loop_stages}, first, paths, checkpoints, callbacks)
    result = trainer.fit()
    evals = {}
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            evals = read_stage_marker(d)["evals"]
    return result, evals, stage_checkpoints(paths.run_dir)


def stage_checkpoints(run_dir: str | Path) -> dict[int, tuple[str, int]]:
    """Stage index -> (final checkpoint directory, step) of a chained run in ``run_dir``."""
    finals = {}
    for path in sorted(Path(run_dir).glob("checkpoint_*")):
        marker = read_stage_marker(path) if path.is_dir() else None
        if marker and marker["finished"]:
            finals[marker["stage"]] = (str(path), int(marker.get("step", 0)))
    return finals


def synthetic_rows(cfg: AlbefConfig, steps_per_epoch: int) -> list[dict]:
    """Generated image-caption tensors as rows, one epoch's worth for every worker (no Ray)."""
    from ..synth.tensors import synthetic_batches

    rows = []
    for batch in synthetic_batches(cfg, steps_per_epoch * cfg.train.num_workers):
        for j in range(batch["input_ids"].shape[0]):
            rows.append({k: batch[k][j].numpy() for k in ("image", "input_ids", "attention_mask")})
    return rows


def train_inputs(cfg: AlbefConfig):
    """``(datasets, steps per epoch, collate, special tokens, iterator kwargs)`` for :func:`launch_pretrain`.

    Caption shards (``data.shards``, split ``data.train_split``) stream through Ray Data; without
    them, generated tensors of ``train.steps_per_epoch`` batches per worker (required: they have
    no size of their own). Starts Ray (:func:`init_ray`) after the inputs are checked.
    """
    if cfg.data.shards:
        from .data import build_pretrain_inputs, iter_kwargs  # Ray Data over Parquet shards

        init_ray(cfg)
        datasets, steps_per_epoch, collate, special = build_pretrain_inputs(cfg)
        return datasets, steps_per_epoch, collate, special, iter_kwargs(cfg)
    steps_per_epoch = cfg.train.steps_per_epoch
    if steps_per_epoch is None:
        raise ConfigError(
            "train.steps_per_epoch: generated tensors (no data.shards) have no size; "
            "set how many batches per worker an epoch holds"
        )
    rows = synthetic_rows(cfg, steps_per_epoch)  # raises a ConfigError before Ray starts
    init_ray(cfg)
    import ray.data

    return {"train": ray.data.from_items(rows)}, steps_per_epoch, None, None, None


def run_pretrain(cfg: AlbefConfig, echo=print):
    """The ``albef-ray pretrain`` job: data, TorchTrainer, MLflow; returns the Ray Result."""
    cfg = absolute_data_paths(cfg)
    datasets, steps_per_epoch, collate, special, loader_kwargs = train_inputs(cfg)
    if cfg.data.shards:
        echo(f"data: {', '.join(cfg.data.shards)} ({steps_per_epoch} steps per epoch)")
    else:
        echo("data: generated tensors (set data.shards to stream Parquet caption shards)")
    paths = run_paths(cfg)
    echo(f"results: {paths.run_dir}")
    result, paths, uri, run_id = launch_pretrain(cfg, datasets, steps_per_epoch, collate, special, loader_kwargs)
    if run_id:
        echo(f"MLflow run {run_id} in {uri}\n  view: {ui_hint(uri)}")
    if result.checkpoint:
        echo(f"last checkpoint: {result.checkpoint.path}")
    return result
