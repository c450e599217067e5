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

from .tracking import PARENT_TAG, TAG_COLUMNS, TAG_ROLE, TAG_SWEEP, TAG_TRIAL, TAG_VARIANT, TAG_VARIANTS

# (MLflow metric key, column header): the paper's columns, in its order.
COLUMNS = [
    ("txt_r1", "TR@1"), ("txt_r5", "TR@5"), ("txt_r10", "TR@10"),
    ("img_r1", "IR@1"), ("img_r5", "IR@5"), ("img_r10", "IR@10"),
    ("r_mean", "mean"),
]
LOSS_KEYS = ("loss", "itc_loss", "itm_loss", "mlm_loss")
# Training curves plotted per variant: the losses, then the in-batch accuracies (ITM's on the
# variant's own negatives: random or hard, which is what tells the two apart over training).
CURVE_KEYS = (*LOSS_KEYS, "itc_acc", "itm_acc")
Columns = list[tuple[str, str]]  # (metric key of a trial dict, header)
LEGACY_PREFIX = "test"  # sweeps without TAG_COLUMNS logged zero-shot recalls as test/<key>
ARTIFACT_DIR = "comparison"


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


def summarize(trials: list[dict], order: list[str] | None = None, columns: Columns = COLUMNS) -> list[VariantRow]:
    """One row per variant from trial dicts ``{"variant", "seed", <column key>: value, ...}``.

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
        stats = {key: mean_std([float(t[key]) for t in mine if t.get(key) is not None]) for key, _ in columns}
        rows.append(VariantRow(name, sorted(int(t["seed"]) for t in mine), stats))
    return rows


def to_markdown(rows: list[VariantRow], digits: int = 2, columns: Columns = COLUMNS) -> str:
    header = ["variant", "seeds", *(title for _, title in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.variant, str(len(row.seeds)),
                 *(row.stats[key].format(digits + 1 if key.endswith("_acc") else digits) for key, _ in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[VariantRow], columns: Columns = COLUMNS) -> str:
    """One line per variant: ``<metric>_mean`` and ``<metric>_std`` (empty for one seed)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["variant", "seeds", *(f"{key}_{part}" for key, _ in columns for part in ("mean", "std"))])
    for row in rows:
        cells = []
        for key, _ in columns:
            stat = row.stats[key]
            cells += [f"{stat.mean:.4f}", "" if stat.std is None else f"{stat.std:.4f}"]
        writer.writerow([row.variant, " ".join(map(str, row.seeds)), *cells])
    return out.getvalue()


def ordering_holds(rows: list[VariantRow], key: str = "r_mean") -> bool:
    """True when every row's mean ``key`` is at least the previous row's (the paper's Table 1 trend)."""
    means = [row.stats[key].mean for row in rows]
    return all(b >= a for a, b in zip(means, means[1:]))


@dataclass
class Difference:
    """Row ``lower`` minus the row above it (``upper``) in one column, with its standard error."""

    upper: str
    lower: str
    column: str
    diff: float
    se: float | None  # sqrt(s1^2/n1 + s2^2/n2); None when either row has a single seed

    @property
    def significant(self) -> bool | None:
        """Whether |diff| exceeds 2 standard errors (None: no spread to judge by)."""
        if self.se is None or math.isnan(self.diff):
            return None
        return abs(self.diff) > 2 * self.se

    def format(self) -> str:
        if self.se is None:
            return f"{self.lower} vs {self.upper}, {self.column}: {self.diff:+.2f} (one seed: no standard error)"
        verdict = "exceeds" if self.significant else "within"
        return f"{self.lower} vs {self.upper}, {self.column}: {self.diff:+.2f} ± {self.se:.2f} (SE), {verdict} 2 SE"


def adjacent_differences(rows: list[VariantRow], columns: Columns) -> list[Difference]:
    """Each row against the row above it, per column: the difference of means and its standard error."""
    out = []
    for upper, lower in zip(rows, rows[1:]):
        for key, title in columns:
            a, b = upper.stats[key], lower.stats[key]
            na, nb = len(upper.seeds), len(lower.seeds)
            se = None if a.std is None or b.std is None else math.sqrt(a.std**2 / na + b.std**2 / nb)
            out.append(Difference(upper.variant, lower.variant, title, b.mean - a.mean, se))
    return out


# ----------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_recalls(rows: list[VariantRow], path: Path, columns: Columns = COLUMNS) -> Path:
    """Grouped bars: one group per recall column (percent), one bar per variant, std as error bars."""
    plt = _pyplot()
    columns = [(key, title) for key, title in columns if not key.endswith("itm_acc")]  # not a percentage
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(columns))]
        means = [row.stats[key].mean for key, _ in columns]
        errs = [row.stats[key].std or 0.0 for key, _ in columns]
        ax.bar(xs, means, width, yerr=errs, capsize=2, label=row.variant)
    ax.set_xticks(range(len(columns)), [title for _, title in columns])
    ax.set_ylabel("recall (%)")
    ax.set_title("retrieval on the held-out split (mean ± std over seeds)")
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
    keys = [k for k in CURVE_KEYS if curves.get(k)]
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


def sweep_columns(parent) -> Columns:
    """The table columns the sweep recorded on its parent run; legacy sweeps: the zero-shot recalls."""
    recorded = parent.data.tags.get(TAG_COLUMNS)
    if recorded:
        return [(key, title) for key, title in json.loads(recorded)]
    return [(f"{LEGACY_PREFIX}/{key}", title) for key, title in COLUMNS]


def read_trials(client, parent, columns: Columns | None = None) -> list[dict]:
    """The parent's child runs as trial dicts: variant, seed, status, run id and the columns' final metrics."""
    columns = columns or sweep_columns(parent)
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
        max_results=10_000,
    )
    trials = []
    for run in runs:
        tags, params = run.data.tags, run.data.params
        trials.append({
            "variant": tags.get(TAG_VARIANT, run.info.run_name), "seed": int(params.get("seed", 0)),
            "trial": tags.get(TAG_TRIAL, run.info.run_name), "run_id": run.info.run_id, "status": run.info.status,
            **{key: run.data.metrics.get(key) for key, _ in columns},
        })
    return sorted(trials, key=lambda t: t["trial"])


def read_curves(client, trials: list[dict]) -> dict[str, dict[str, list[list[tuple[int, float]]]]]:
    curves: dict[str, dict[str, list]] = {}
    for trial in trials:
        for key in CURVE_KEYS:
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
    columns = sweep_columns(parent)
    trials = read_trials(client, parent, columns)
    if not trials:
        raise LookupError(f"parent run {parent.info.run_id} has no trial runs")
    evaluated = [t for t in trials if any(t.get(key) is not None for key, _ in columns)]
    rows = summarize(evaluated, order, columns)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(rows, columns=columns)
    differences = adjacent_differences(rows, [c for c in columns if not c[0].endswith("itm_acc")])
    files = [out / "table.md", out / "table.csv"]
    files[0].write_text(markdown + "".join(f"\n- {d.format()}" for d in differences) + "\n")
    files[1].write_text(to_csv(rows, columns))
    if rows:
        files.append(plot_recalls(rows, out / "recalls.png", columns))
    rank = {name: i for i, name in enumerate(order)}
    curves = read_curves(client, sorted(trials, key=lambda t: rank.get(t["variant"], len(rank))))  # legend order
    if curves:
        files.append(plot_loss_curves(curves, out / "loss_curves.png"))
    for path in files:
        client.log_artifact(parent.info.run_id, str(path), ARTIFACT_DIR)
    name = parent.data.tags.get(TAG_SWEEP, parent.info.run_name)
    echo(f"sweep {name} (MLflow parent run {parent.info.run_id}): {len(evaluated)} of {len(trials)} trials evaluated")
    echo(markdown.rstrip())
    missing = [f"{t['trial']} ({t['status']})" for t in trials if t not in evaluated]
    if missing:
        echo(f"not in the table (no metrics): {', '.join(missing)}")
    if differences:
        echo("each row against the row above (difference of means, standard error over seeds):")
        for difference in differences:
            echo(f"  {difference.format()}")
    echo(f"written: {', '.join(str(p) for p in files)} (also parent-run artifacts in {ARTIFACT_DIR}/)")
    return Comparison(parent.info.run_id, rows, trials, files, markdown)
