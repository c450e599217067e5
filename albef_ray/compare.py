"""The comparison of a sweep's trials: read back from MLflow, one row per variant.

The table is the paper's Table 1 layout: text retrieval (TR, image -> text) and image
retrieval (IR, text -> image) recall at 1/5/10 and their mean, each as mean ± sample std over
the variant's seeds. The maths (:func:`summarize`, :func:`to_markdown`, :func:`to_csv`) is
plain Python and unit-tested; :func:`compare_sweep` reads the runs through an
``MlflowClient``, writes ``table.md``, ``table.csv``, ``recalls.png`` and ``loss_curves.png``
and logs them as artifacts of the sweep's parent run (folder ``comparison/``).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# (MLflow metric key, column header): the paper's columns, in its order.
COLUMNS = [
    ("txt_r1", "TR@1"), ("txt_r5", "TR@5"), ("txt_r10", "TR@10"),
    ("img_r1", "IR@1"), ("img_r5", "IR@5"), ("img_r10", "IR@10"),
    ("r_mean", "mean"),
]
LOSS_KEYS = ("loss", "itc_loss", "itm_loss", "mlm_loss")
ARTIFACT_DIR = "comparison"
# Tags written by the sweep launcher (albef_ray/launch/sweep.py) and read here.
TAG_SWEEP, TAG_ROLE, TAG_VARIANT, TAG_VARIANTS, TAG_TRIAL = "sweep", "sweep_role", "variant", "sweep_variants", "trial"
PARENT_TAG = "mlflow.parentRunId"


@dataclass
class Stat:
    mean: float
    std: float | None  # None with a single seed

    def format(self, digits: int = 2) -> str:
        if math.isnan(self.mean):
            return "–"
        return f"{self.mean:.{digits}f}" + ("" if self.std is None else f" ± {self.std:.{digits}f}")


@dataclass
class VariantRow:
    variant: str
    seeds: list[int]
    stats: dict[str, Stat] = field(default_factory=dict)


def mean_std(values: list[float]) -> Stat:
    """Mean and sample standard deviation (n - 1); no std for one value, NaN for none."""
    if not values:
        return Stat(float("nan"), None)
    mean = sum(values) / len(values)
    if len(values) == 1:
        return Stat(mean, None)
    return Stat(mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)))


def summarize(trials: list[dict], order: list[str] | None = None) -> list[VariantRow]:
    """One row per variant from trial dicts ``{"variant", "seed", "txt_r1", ...}``.

    Rows follow ``order`` (the sweep file's), then any other variant in first-seen order; a
    trial missing a metric (failed, or not evaluated yet) does not count for that metric.
    """
    names = list(order or [])
    names += [t["variant"] for t in trials if t["variant"] not in names]
    rows = []
    for name in dict.fromkeys(names):
        mine = [t for t in trials if t["variant"] == name]
        if not mine:
            continue
        stats = {key: mean_std([float(t[key]) for t in mine if t.get(key) is not None]) for key, _ in COLUMNS}
        rows.append(VariantRow(name, sorted(int(t["seed"]) for t in mine), stats))
    return rows


def to_markdown(rows: list[VariantRow], digits: int = 2) -> str:
    header = ["variant", "seeds", *(title for _, title in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.variant, str(len(row.seeds)), *(row.stats[key].format(digits) for key, _ in COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[VariantRow]) -> str:
    """One line per variant: ``<metric>_mean`` and ``<metric>_std`` (empty for one seed)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["variant", "seeds", *(f"{key}_{part}" for key, _ in COLUMNS for part in ("mean", "std"))])
    for row in rows:
        cells = []
        for key, _ in COLUMNS:
            stat = row.stats[key]
            cells += [f"{stat.mean:.4f}", "" if stat.std is None else f"{stat.std:.4f}"]
        writer.writerow([row.variant, " ".join(map(str, row.seeds)), *cells])
    return out.getvalue()


def ordering_holds(rows: list[VariantRow], key: str = "r_mean") -> bool:
    """True when every row's mean ``key`` is at least the previous row's (the paper's Table 1 trend)."""
    means = [row.stats[key].mean for row in rows]
    return all(b >= a for a, b in zip(means, means[1:]))


# ----------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_recalls(rows: list[VariantRow], path: Path) -> Path:
    """Grouped bars: one group per recall column, one bar per variant, std as error bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(COLUMNS))]
        means = [row.stats[key].mean for key, _ in COLUMNS]
        errs = [row.stats[key].std or 0.0 for key, _ in COLUMNS]
        ax.bar(xs, means, width, yerr=errs, capsize=2, label=row.variant)
    ax.set_xticks(range(len(COLUMNS)), [title for _, title in COLUMNS])
    ax.set_ylabel("recall (%)")
    ax.set_title("zero-shot retrieval on the held-out split")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_loss_curves(curves: dict[str, dict[str, list[list[tuple[int, float]]]]], path: Path) -> Path:
    """One panel per loss key; per variant the mean over seeds at each step.

    ``curves[loss_key][variant]`` is a list (one per seed) of ``(step, value)`` points. Each
    objective has its own panel because the total ``loss`` sums different objectives per variant.
    """
    plt = _pyplot()
    keys = [k for k in LOSS_KEYS if curves.get(k)]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for variant, runs in curves[key].items():
            by_step: dict[int, list[float]] = {}
            for run in runs:
                for step, value in run:
                    by_step.setdefault(step, []).append(value)
            steps = sorted(by_step)
            ax.plot(steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], label=variant, linewidth=1)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- MLflow


def check_store_exists(uri: str) -> None:
    """A local store (SQLite file, file store folder) must exist: MLflow would create an empty one."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
    elif uri.startswith("file://"):
        path = Path(uri[len("file://"):])
    elif "://" not in uri:
        path = Path(uri)
    else:
        return  # a tracking server answers for itself
    if not path.exists():
        raise LookupError(f"no MLflow store at {uri} (no sweep has been tracked there; see --tracking-uri)")


def find_parent(client, sweep: str | None = None, run_id: str | None = None, experiment: str | None = None):
    """The sweep's parent run: by id, or the latest parent run tagged with the sweep name."""
    if run_id:
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise LookupError(f"no MLflow run {run_id!r} in {client.tracking_uri}") from None
        if run.data.tags.get(TAG_ROLE) != "parent":
            raise LookupError(f"MLflow run {run_id} is not a sweep's parent run (tag {TAG_ROLE} is not 'parent')")
        return run
    experiments = [e.experiment_id for e in client.search_experiments()]
    if experiment:
        found = client.get_experiment_by_name(experiment)
        experiments = [found.experiment_id] if found else []
    runs = client.search_runs(
        experiments, filter_string=f"tags.{TAG_SWEEP} = '{sweep}' and tags.{TAG_ROLE} = 'parent'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    if not runs:
        raise LookupError(f"no MLflow parent run for sweep {sweep!r}")
    return runs[0]


def read_trials(client, parent) -> list[dict]:
    """The parent's child runs as trial dicts: variant, seed, status, run id and final metrics."""
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
        max_results=10_000,
    )
    trials = []
    for run in runs:
        tags, params = run.data.tags, run.data.params
        split = params.get("eval.split", "test")  # retrieval metrics are logged as <split>/<key>
        trials.append({
            "variant": tags.get(TAG_VARIANT, run.info.run_name), "seed": int(params.get("seed", 0)),
            "trial": tags.get(TAG_TRIAL, run.info.run_name), "run_id": run.info.run_id, "status": run.info.status,
            **{key: run.data.metrics.get(f"{split}/{key}") for key, _ in COLUMNS},
        })
    return sorted(trials, key=lambda t: t["trial"])


def read_curves(client, trials: list[dict]) -> dict[str, dict[str, list[list[tuple[int, float]]]]]:
    curves: dict[str, dict[str, list]] = {}
    for trial in trials:
        for key in LOSS_KEYS:
            hist = client.get_metric_history(trial["run_id"], key)
            if hist:
                points = sorted((m.step, m.value) for m in hist)
                curves.setdefault(key, {}).setdefault(trial["variant"], []).append(points)
    return curves


@dataclass
class Comparison:
    parent_run_id: str
    rows: list[VariantRow]
    trials: list[dict]
    files: list[Path]
    markdown: str


def compare_sweep(uri: str, out_dir: str | Path, sweep: str | None = None, run_id: str | None = None,
                  echo: Callable[[str], None] = print) -> Comparison:
    """Read the sweep's runs, print and write the table and figures, log them to the parent run."""
    from mlflow.tracking import MlflowClient

    check_store_exists(uri)  # reading must not leave an empty store behind
    client = MlflowClient(tracking_uri=uri)
    parent = find_parent(client, sweep, run_id)
    order = json.loads(parent.data.tags.get(TAG_VARIANTS, "[]"))
    trials = read_trials(client, parent)
    if not trials:
        raise LookupError(f"parent run {parent.info.run_id} has no trial runs")
    evaluated = [t for t in trials if t.get("r_mean") is not None]
    rows = summarize(evaluated, order)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(rows)
    files = [out / "table.md", out / "table.csv"]
    files[0].write_text(markdown)
    files[1].write_text(to_csv(rows))
    if rows:
        files.append(plot_recalls(rows, out / "recalls.png"))
    rank = {name: i for i, name in enumerate(order)}
    curves = read_curves(client, sorted(trials, key=lambda t: rank.get(t["variant"], len(rank))))  # legend order
    if curves:
        files.append(plot_loss_curves(curves, out / "loss_curves.png"))
    for path in files:
        client.log_artifact(parent.info.run_id, str(path), ARTIFACT_DIR)
    name = parent.data.tags.get(TAG_SWEEP, parent.info.run_name)
    echo(f"sweep {name} (MLflow parent run {parent.info.run_id}): {len(evaluated)} of {len(trials)} trials evaluated")
    echo(markdown.rstrip())
    missing = [f"{t['trial']} ({t['status']})" for t in trials if t.get("r_mean") is None]
    if missing:
        echo(f"not in the table (no retrieval metrics): {', '.join(missing)}")
    if len(rows) > 1:
        verdict = "holds" if ordering_holds(rows) else "does not hold"
        echo(f"ordering (each row's mean recall >= the previous row's): {verdict}")
    echo(f"written: {', '.join(str(p) for p in files)} (also parent-run artifacts in {ARTIFACT_DIR}/)")
    return Comparison(parent.info.run_id, rows, trials, files, markdown)
