"""Ray Tune edge: a sweep file becomes one Tune trial per (variant, grid point, seed).

Each trial is a Tune function trainable (the pattern Ray 2.60 supports for Train V2 inside
Tune) that

1. opens its MLflow child run under the sweep's parent run (params: the flattened config,
   ``sweep`` and ``variant``; tags ``variant``, ``trial``, ``mlflow.parentRunId``),
2. pretrains, evaluates the final weights (``zero_shot``) with the evaluation its task registers
   (:mod:`albef_ray.tasks`), then fine-tunes and evaluates each ``downstream`` stage, all
   logged to the child run, and reports to Tune. When every stage streams caption shards on
   equally many workers with equal resources (the usual case) the stages chain in one
   ``TorchTrainer`` (:func:`~albef_ray.launch.train.launch_chain`): one worker group per trial,
   each evaluation on rank 0 before the stage's last checkpoint is reported (on 2 cores, two
   Table 1 trials: 124 s instead of 162 s, the same numbers). Otherwise each stage is a
   ``TorchTrainer`` of its own (:func:`launch_pretrain`) and each evaluation a Ray task
   holding one train worker's resources. ``TuneReportCallback`` makes every rank-0 report a
   Tune result.

Resources: the trial function only waits on its TorchTrainer, so it holds ``trial_cpus``
(default 0: a memory-only bundle); the Train workers take ``train.num_workers x
train.cpus_per_worker`` as in ``albef-ray pretrain``, and what is left decodes data. Holding
a whole CPU per trial would starve Ray Data on a 2-core machine (see docs/sweeps.md).

Layout under ``<run.storage_path>/<sweep name>/``: ``sweep.json`` (the expanded trials),
``parent/mlflow_run_id.txt``, ``tune/`` (Tune's experiment state), ``trials/<key>/`` (each
trial's Train checkpoints) and ``compare/``. Running the same command again resumes: Tune
restores the experiment, finished trials are kept, unfinished and failed ones run again and
their TorchTrainer continues from its last checkpoint in the same MLflow child run (a chained
trial in the stage that checkpoint belongs to: ``stage.json``; a finished stage is neither
trained nor evaluated again). Trials reuse their Tune actor (``reuse_actors``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import AlbefConfig, ConfigError, build_config, dump_yaml
from ..sweep import ZERO_SHOT, Sweep, Trial, table_columns, trial_config
from ..tasks import get_task
from ..tracking import PARENT_TAG, TAG_COLUMNS, TAG_ROLE, TAG_SWEEP, TAG_TRIAL, TAG_VARIANT, TAG_VARIANTS
from .common import absolute_data_paths, init_ray

log = logging.getLogger(__name__)
TRIALS_FILE = "sweep.json"
Evaluator = Callable[..., dict]  # (cfg, checkpoint) -> metrics; by default the task's registered evaluation


@dataclass
class SweepOutcome:
    sweep_dir: Path
    tracking_uri: str
    parent_run_id: str
    finished: list[str]
    failed: dict[str, str]  # trial key -> error
    resumed: bool


def sweep_dir(sweep: Sweep) -> Path:
    first = sweep.config(sweep.trials[0])
    return Path(first.run.storage_path).expanduser().resolve() / sweep.spec.name


def _check_same_sweep(directory: Path, trials: list[dict]) -> bool:
    """True when ``directory`` holds this sweep already (resume); an error when another one."""
    path = directory / TRIALS_FILE
    if not path.exists():
        return False
    if json.loads(path.read_text()) != trials:
        raise ConfigError(
            f"{directory} holds a sweep with other trials (changed file or overrides); "
            "rename the sweep or delete that folder to start afresh"
        )
    return True


def _open_parent(sweep: Sweep, cfg: AlbefConfig, uri: str, directory: Path) -> str:
    """The sweep's MLflow parent run: created once, reopened (``parent/mlflow_run_id.txt``) on resume."""
    from ..tracking import RUN_ID_FILE, mlflow_client, open_run

    run_dir = directory / "parent"
    existed = (run_dir / RUN_ID_FILE).exists()
    tags = {
        TAG_SWEEP: sweep.spec.name, TAG_ROLE: "parent", "model.size": cfg.model.size,
        TAG_VARIANTS: json.dumps(list(sweep.spec.variants)), TAG_COLUMNS: json.dumps(table_columns(sweep)),
    }
    # open_run logs the first trial's flattened config; the sweep's own settings follow.
    run_id = open_run(cfg, uri, run_dir, sweep.spec.name, tags)
    if not existed:
        client = mlflow_client(uri)
        for key, value in {
            "sweep.file": str(sweep.path), "sweep.trials": len(sweep.trials), "sweep.seeds": json.dumps(sweep.spec.seeds),
            "sweep.grid": json.dumps(sweep.spec.grid), "sweep.max_concurrent_trials": sweep.spec.max_concurrent_trials,
        }.items():
            client.log_param(run_id, key, str(value))
        client.log_artifact(run_id, str(sweep.path))
        client.log_artifact(run_id, str(directory / TRIALS_FILE))
    return run_id


def _run_cfg(cfg: AlbefConfig, directory: Path, name: str, uri: str, tags: dict, prefix: str = "") -> AlbefConfig:
    """``cfg`` running as ``<directory>/trials/<name>``, tracked in ``uri`` with ``tags``; paths absolute."""
    cfg = cfg.model_copy(update={
        "run": cfg.run.model_copy(update={"storage_path": str(directory / "trials"), "name": name}),
        "tracking": cfg.tracking.model_copy(update={"tracking_uri": uri, "tags": tags, "metric_prefix": prefix}),
    })
    return absolute_data_paths(cfg)


def _trial_cfgs(sweep: Sweep, trial: Trial, directory: Path, uri: str, parent_id: str) -> dict[str, dict]:
    """The trial's pretraining config (key ``""``) and each downstream stage's, as JSON data.

    A stage runs as ``<trial key>-<stage>`` and logs into the trial's MLflow run with its
    metrics prefixed ``<stage>/``; its ``model.checkpoint`` is set when pretraining has ended.
    """
    cfg = trial_config(sweep.base, trial)
    tags = {
        **cfg.tracking.tags, TAG_SWEEP: sweep.spec.name, TAG_ROLE: "trial", TAG_VARIANT: trial.variant,
        TAG_TRIAL: trial.key, PARENT_TAG: parent_id,
    }
    out = {"": _run_cfg(cfg, directory, trial.key, uri, tags).model_dump(mode="json")}
    for stage in sweep.spec.downstream:
        stage_cfg = sweep.stage_config(stage, trial)
        stage_tags = {**stage_cfg.tracking.tags, **tags}
        out[stage.name] = _run_cfg(
            stage_cfg, directory, f"{trial.key}-{stage.name}", uri, stage_tags, f"{stage.name}/"
        ).model_dump(mode="json")
    return out


def _evaluate_task(evaluate: Evaluator, cfg_data: dict, checkpoint: str) -> dict:
    import torch

    from ..config import build_config

    cfg = build_config(cfg_data)
    torch.set_num_threads(max(1, round(cfg.train.cpus_per_worker)))  # Ray sets 1 thread in tasks
    return evaluate(cfg, checkpoint)


class _StageLog:
    """``stages.json`` in the trial's folder: what each finished stage produced, so a retried
    trial (Tune ``max_failures``) continues after the last finished stage."""

    def __init__(self, path: Path):
        self.path = path
        self.done = json.loads(path.read_text()) if path.exists() else {}

    def record(self, name: str, value: dict) -> None:
        self.done[name] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.done, indent=1))
        tmp.replace(self.path)


def make_trainable(sweep: Sweep, directory: Path, uri: str, parent_id: str, evaluate: Evaluator | None):
    """The Tune function trainable; ``config["trial"]`` is a trial key.

    A trial: pretraining, the zero-shot evaluation of its final checkpoint (``zero_shot``), then
    each ``downstream`` stage (fine-tuning from that checkpoint, then the stage's evaluation),
    all in the trial's one MLflow child run (stage metrics prefixed ``<stage>/``).
    """
    trials = {t.key: t for t in sweep.trials}
    # Built here, in the driver: relative data paths resolve against the caller's directory,
    # not the Ray session folder the trial runs in.
    configs = {t.key: _trial_cfgs(sweep, t, directory, uri, parent_id) for t in sweep.trials}

    def albef_trial(config: dict) -> None:
        import ray
        from ray import tune
        from ray.tune.integration.ray_train import TuneReportCallback

        from ..eval.checkpoint import resolve_checkpoint
        from ..eval.tracking import log_retrieval
        from ..tracking import RUN_ID_FILE, mlflow_client, open_run
        from .train import chainable, launch_chain, launch_pretrain, train_inputs

        trial = trials[config["trial"]]
        cfg = build_config(configs[trial.key][""])
        run_dir = directory / "trials" / trial.key
        # Opened here so the sweep's params go in first; launch_pretrain reopens it by run_dir.
        run_id = open_run(cfg, uri, run_dir, trial.key, cfg.tracking.tags)
        client = mlflow_client(uri)
        client.log_param(run_id, "sweep", sweep.spec.name)
        client.log_param(run_id, "variant", trial.variant)
        stages = _StageLog(run_dir / "stages.json")

        def train(stage_cfg: AlbefConfig, name: str) -> tuple[str, int]:
            key = f"train:{name}"
            if key in stages.done:
                return stages.done[key]["checkpoint"], stages.done[key]["step"]
            datasets, steps, collate, special, loader_kwargs = train_inputs(stage_cfg)
            result, _, _, _ = launch_pretrain(
                stage_cfg, datasets, steps, collate, special, loader_kwargs, callbacks=[TuneReportCallback()]
            )
            done = {"checkpoint": str(resolve_checkpoint(result.checkpoint.path)),
                    "step": int((result.metrics or {}).get("step") or 0)}
            stages.record(key, done)
            return done["checkpoint"], done["step"]

        def score(stage_cfg: AlbefConfig, checkpoint: str, step: int, prefix: str) -> dict:
            key = f"eval:{prefix}"
            if key not in stages.done:
                task = ray.remote(_evaluate_task).options(
                    num_cpus=stage_cfg.train.cpus_per_worker, num_gpus=1 if stage_cfg.train.use_gpu else 0,
                    scheduling_strategy="DEFAULT",  # not inside this trial's (memory-only) placement group
                )
                evaluator = evaluate or get_task(stage_cfg.task).evaluate()
                metrics = ray.get(task.remote(evaluator, stage_cfg.model_dump(mode="json"), checkpoint))
                log_retrieval(stage_cfg, metrics, checkpoint, run_id=run_id, step=step, prefix=prefix)
                stages.record(key, metrics)
            return {f"{prefix}/{k}": float(v) for k, v in stages.done[key].items()}

        def chained() -> int:
            # Pretraining and every downstream stage in one TorchTrainer: one worker group per
            # trial, and each stage's evaluation on its worker, not in a process of its own.
            zero_shot = (evaluate or get_task(cfg.task).evaluate()) if sweep.spec.zero_shot else None
            stage_cfgs = [(cfg, zero_shot, ZERO_SHOT)]
            for stage, stage_cfg in zip(sweep.spec.downstream, downstream):
                stage_cfg = stage_cfg.model_copy(update={"run": stage_cfg.run.model_copy(update={"name": trial.key})})
                stage_cfgs.append((stage_cfg, evaluate or get_task(stage_cfg.task).evaluate(), stage.name))
            result, evals, finals = launch_chain(stage_cfgs, run_id=run_id, callbacks=[TuneReportCallback()])
            names = ["pretrain", *(stage.name for stage in sweep.spec.downstream)]
            for index, (path, at) in sorted(finals.items()):  # as the per-stage trials record them
                stages.record(f"train:{names[index]}", {"checkpoint": str(resolve_checkpoint(path)), "step": at})
            for prefix, metrics in evals.items():
                stages.record(f"eval:{prefix}", metrics)
                reported.update({f"{prefix}/{k}": float(v) for k, v in metrics.items()})
            return int((result.metrics or {}).get("step") or 0)

        reported: dict[str, float] = {}
        downstream = [build_config(configs[trial.key][s.name]) for s in sweep.spec.downstream]
        try:
            if chainable([cfg, *downstream]):
                step = chained()
            else:  # one TorchTrainer per stage, each stage's evaluation as a Ray task
                checkpoint, step = train(cfg, "pretrain")
                if sweep.spec.zero_shot:
                    reported.update(score(cfg, checkpoint, step, ZERO_SHOT))
                for stage, stage_cfg in zip(sweep.spec.downstream, downstream):
                    stage_cfg = stage_cfg.model_copy(
                        update={"model": stage_cfg.model.model_copy(update={"checkpoint": checkpoint})}
                    )
                    stage_dir = directory / "trials" / stage_cfg.run.name
                    stage_dir.mkdir(parents=True, exist_ok=True)
                    (stage_dir / RUN_ID_FILE).write_text(run_id)  # the stage logs into the trial's run
                    stage_checkpoint, stage_step = train(stage_cfg, stage.name)
                    reported.update(score(stage_cfg, stage_checkpoint, stage_step, stage.name))
        except Exception:
            client.set_terminated(run_id, status="FAILED")
            raise
        client.set_terminated(run_id, status="FINISHED")
        tune.report({**reported, "step": step or 0})

    return albef_trial


def run_sweep(sweep: Sweep, echo=print, evaluate: Evaluator | None = None) -> SweepOutcome:
    """Run (or resume) the sweep on Ray Tune; returns which trials finished and which failed."""
    from ray import tune

    from ..tracking import mlflow_client, resolve_tracking_uri

    first = sweep.config(sweep.trials[0])
    if not first.tracking.enabled:
        raise ConfigError("tracking.enabled: sweeps are recorded and compared in MLflow; enable tracking")
    directory = sweep_dir(sweep)
    uri = resolve_tracking_uri(first, directory.parent)
    trials = [t.to_dict() for t in sweep.trials]
    resumed = _check_same_sweep(directory, trials)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / TRIALS_FILE).write_text(json.dumps(trials, indent=1))
    parent_id = _open_parent(sweep, first, uri, directory)
    (directory / "base.yaml").write_text(dump_yaml(first))
    echo(f"sweep {sweep.spec.name}: {len(trials)} trial(s), {sweep.spec.max_concurrent_trials} at a time; "
         f"results in {directory}")
    echo(f"MLflow parent run {parent_id} in {uri}")

    init_ray(first)
    head = {"CPU": sweep.spec.trial_cpus} if sweep.spec.trial_cpus else {"memory": 64 * 2**20}
    trainable = tune.with_resources(
        make_trainable(sweep, directory, uri, parent_id, evaluate), tune.PlacementGroupFactory([head])
    )
    param_space = {"trial": tune.grid_search([t.key for t in sweep.trials])}
    tune_path = directory / "tune"
    status = "FAILED"
    try:
        if resumed and tune.Tuner.can_restore(str(tune_path)):
            echo("resuming: finished trials are kept, the others run (again)")
            tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, resume_errored=True, param_space=param_space)
        else:
            tuner = tune.Tuner(
                trainable, param_space=param_space,
                tune_config=tune.TuneConfig(
                    max_concurrent_trials=sweep.spec.max_concurrent_trials,
                    reuse_actors=True,  # a trial's process (torch, MLflow imported) serves the next trial
                    trial_name_creator=lambda t: t.config["trial"], trial_dirname_creator=lambda t: t.config["trial"],
                ),
                run_config=tune.RunConfig(
                    name="tune", storage_path=str(directory), verbose=1,
                    failure_config=tune.FailureConfig(max_failures=sweep.spec.max_failures),
                ),
            )
        grid = tuner.fit()
        finished, failed = [], {}
        for result in grid:
            key = result.config["trial"]
            if result.error is None:
                finished.append(key)
            else:
                failed[key] = str(result.error).strip().splitlines()[-1][:300]
        status = "FINISHED" if not failed else "FAILED"
        if failed:
            mlflow_client(uri).set_tag(parent_id, "failed_trials", ", ".join(sorted(failed)))
        return SweepOutcome(directory, uri, parent_id, finished, failed, resumed)
    finally:
        mlflow_client(uri).set_terminated(parent_id, status=status)
