"""Per-step overhead of the Ray-launched training loop versus the same loop in one process.

Both run the same config for the same steps on generated data; the first ``--warmup`` steps
are excluded. The Ray figure is the worker's own step time (data wait included) as logged to
MLflow; the plain figure times ``train_step`` over batches already in memory, plus the batch
hand-over. Usage::

    python benchmarks/ray_overhead.py [--size albef_tiny] [--batch 32] [--steps 60]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def plain_step_times(cfg, steps: int) -> list[float]:
    from albef_ray.tasks import build_task
    from albef_ray.train.loop import Schedule, train_step
    from albef_ray.train.optim import build_optimizer
    from albef_ray.synth.tensors import synthetic_batches

    torch.manual_seed(cfg.seed)
    task = build_task(cfg).train()
    optimizer = build_optimizer(task, cfg.optim)
    schedule = Schedule.from_config(cfg)
    batches = synthetic_batches(cfg, steps)
    times = []
    for step, batch in enumerate(batches):
        t0 = time.perf_counter()
        train_step(task, optimizer, batch, step, cfg, schedule)
        times.append(time.perf_counter() - t0)
    return times


def ray_step_times(cfg, steps: int) -> list[float]:
    from mlflow.tracking import MlflowClient

    from albef_ray.launch.train import run_pretrain

    run_pretrain(cfg, echo=lambda *_: None)
    client = MlflowClient(f"sqlite:///{cfg.run.storage_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])[0]
    hist = client.get_metric_history(run.info.run_id, "step_time_s")
    wait = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "data_wait_frac")}
    # each point is the mean over the log window ending at its step
    return [(m.step, m.value, wait[m.step]) for m in sorted(hist, key=lambda m: m.step)]

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="albef_tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=10, help="train.log_every_steps (each log is a ray.train.report)")
    a = ap.parse_args()
    import ray

    from albef_ray.config import load_config

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("experiments/demo_cpu.yaml", [
            f"model.size={a.size}", f"train.batch_size={a.batch}", "train.num_workers=1", f"train.max_steps={a.steps}",
            f"train.steps_per_epoch={a.steps}", f"train.log_every_steps={a.log_every}", f"train.checkpoint_every_steps={10 * a.steps}",
            f"train.cpus_per_worker={a.threads}", f"run.storage_path={tmp}", f"momentum.queue_size={a.batch * 8}",
        ])
        plain = plain_step_times(cfg, a.steps)[a.warmup:]
        ray.init(num_cpus=a.threads + 1,  # +1 logical CPU for the controller and data actors
                  include_dashboard=False, log_to_driver=False)
        windows = [w for w in ray_step_times(cfg, a.steps) if w[0] > a.warmup]
        ray.shutdown()
    p = statistics.mean(plain)
    r = statistics.mean(w[1] for w in windows)
    wait = statistics.mean(w[2] for w in windows)
    print(f"{a.size} batch {a.batch}, steps {a.warmup}-{a.steps}, mean s/step:")
    print(f"  plain process : {p * 1000:.1f} ms")
    print(f"  Ray Train     : {r * 1000:.1f} ms (1 worker; ray.train.report + MLflow every {a.log_every} steps)")
    print(f"  overhead      : {100 * (r / p - 1):+.1f} %  (of the Ray step, {100 * wait:.0f} % waiting for data)")


if __name__ == "__main__":
    main()
