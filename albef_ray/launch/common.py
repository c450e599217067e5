"""What every launcher shares: run paths, input checks before Ray starts, connecting to Ray.

Pretraining, fine-tuning and sweeps (:mod:`.train`, :mod:`.finetune`, :mod:`.sweep`) and the
CLI use these; none of them imports another launcher for them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..config import AlbefConfig, ConfigError


@dataclass
class RunPaths:
    storage: Path  # results root
    name: str

    @property
    def run_dir(self) -> Path:
        return self.storage / self.name


def run_paths(cfg: AlbefConfig) -> RunPaths:
    storage = Path(cfg.run.storage_path).expanduser().resolve()
    name = cfg.run.name or f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
    return RunPaths(storage, name)


_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def looks_local(path: str) -> bool:
    """Whether a weights setting names a local path rather than a timm tag or hub name."""
    if "://" in path:
        return False
    first = Path(path).parts[0] if Path(path).parts else ""
    return (
        path.startswith(("/", "./", "../", "~")) or path.endswith(_WEIGHT_SUFFIXES)
        or ("/" in path and Path(first).is_dir())
    )


def check_local_paths(cfg: AlbefConfig) -> None:
    """Missing local inputs fail here, before any model, tokenizer or Ray is loaded.

    Checked: ``model.vit_init`` / ``bert_init`` / ``checkpoint`` and ``data.tokenizer`` when they
    name local paths, and every ``data.shards`` / ``eval.shards`` root
    (:func:`~albef_ray.data.manifest.dataset_problem`: missing, or an unfinished build).
    """
    from ..data.manifest import dataset_problem

    for key in ("vit_init", "bert_init", "checkpoint"):
        path = getattr(cfg.model, key)
        if path and looks_local(path) and not Path(path).expanduser().exists():
            raise ConfigError(f"model.{key}: {path} does not exist")
    for name, roots in (("data.shards", cfg.data.shards), ("eval.shards", cfg.eval.shards)):
        for root in roots:
            if problem := dataset_problem(root):
                raise ConfigError(f"{name}: {problem}")
    if looks_local(cfg.data.tokenizer) and not Path(cfg.data.tokenizer).expanduser().exists():
        raise ConfigError(f"data.tokenizer: {cfg.data.tokenizer} does not exist")


def absolute_data_paths(cfg: AlbefConfig) -> AlbefConfig:
    """Local data, tokenizer and weight paths made absolute: Ray workers run in a session folder.

    Raises:
        ConfigError: a local input is missing (:func:`check_local_paths`).
    """
    check_local_paths(cfg)

    def fix(path: str) -> str:
        return str(Path(path).resolve()) if "://" not in path and Path(path).exists() else path

    data = cfg.data.model_copy(update={"shards": [fix(p) for p in cfg.data.shards], "tokenizer": fix(cfg.data.tokenizer)})
    evaluation = cfg.eval.model_copy(update={"shards": [fix(p) for p in cfg.eval.shards]})
    model = cfg.model.model_copy(
        update={key: getattr(cfg.model, key) and fix(getattr(cfg.model, key)) for key in ("checkpoint", "vit_init", "bert_init")}
    )
    return cfg.model_copy(update={"data": data, "eval": evaluation, "model": model})


# Seconds a cluster started here keeps an idle pooled worker (Ray's default: 1 s). Decode and
# evaluation tasks run in pooled workers, and each new one imports torch, timm and the model
# code (~6 CPU-seconds); with 1 s they are killed between a trial's epochs and stages and
# start again. Measured on 2 cores (two Table 1 trials at a time): 11 % less wall time.
IDLE_WORKER_KEEP_S = 300

# Ray Train V2 starts a preemption watcher actor per TorchTrainer (a process polling Ray's
# node-drain state every 5 s). A single machine started here is never drained, so a cluster
# started here runs without it: one process start fewer per training run (a sweep trial runs
# two). A value already set wins; a cluster joined by address is left as it is.
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def init_ray(cfg: AlbefConfig) -> None:
    """Connect to ``run.address`` / ``$RAY_ADDRESS`` (e.g. under ``ray job submit``) or start locally.

    A cluster started here keeps idle workers for :data:`IDLE_WORKER_KEEP_S` (the raylet reads
    ``RAY_idle_worker_killing_time_threshold_ms`` at start) and runs Ray Train without the
    preemption watcher (:data:`LOCAL_ENV`); a value already set wins, and a cluster joined by
    address keeps its own settings. Ray's memory monitor still kills idle workers under memory
    pressure.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", str(IDLE_WORKER_KEEP_S * 1000))
    if not (cfg.run.address or os.environ.get("RAY_ADDRESS")):
        for key, value in LOCAL_ENV.items():
            os.environ.setdefault(key, value)
    ray.init(address=cfg.run.address, log_to_driver=True)
