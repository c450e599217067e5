"""Sweep files (``ablations/*.yaml``): a base experiment, variants, grids and seeds, as trials.

A sweep file names a base experiment and lists what differs between trials as dotted
overrides, the same names as in experiment YAML and on the command line::

    name: table1
    base: ../experiments/table1_synth.yaml     # relative to this file
    overrides: {train.max_steps: 900}          # every trial
    variants:                                  # ordered: the comparison table keeps this order
      MLM+ITM: {itc.enabled: false, itm.hard_negatives: false, mod.itc: false, mod.mlm: false}
      ITC+MLM+ITM_hard+MoD: {}
    grid: {mod.alpha: [0.2, 0.4]}              # optional, crossed with every variant
    seeds: [0, 1]

:func:`expand` turns it into one :class:`Trial` per (variant, grid point, seed) and validates
every trial's full config before anything starts, so a bad field fails in a second with the
variant and dotted path named, not an hour into the sweep. Nothing here imports Ray; the code
never looks at a variant's name, only at the switches its overrides set.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .config import AlbefConfig, ConfigError, build_config, load_yaml, parse_override, set_dotted
from .tasks import get_task


class StageSpec(BaseModel):
    """A downstream stage of every trial: fine-tune the pretrained checkpoint, then evaluate it.

    The stage's config is its own experiment file (the paper fine-tunes every pretraining
    variant with one recipe), plus ``overrides``; the trial supplies the seed, the run folder,
    MLflow and ``model.checkpoint`` (its pretrained weights). The evaluation is the one
    registered for the stage config's ``task`` (:mod:`albef_ray.tasks` names its table columns).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Column prefix in the table and metric prefix in MLflow (<name>/txt_r1, ...).")
    experiment: str = Field(description="Fine-tuning experiment YAML, relative to the sweep file.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted overrides of that experiment.")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", value) or value == ZERO_SHOT:
            raise ValueError(f"{value!r}: a stage name is letters, digits, '_', '.', '-' and not {ZERO_SHOT!r}")
        return value


ZERO_SHOT = "zeroshot"  # metric prefix of the pretrained checkpoint's own evaluation
class SweepSpec(BaseModel):
    """What a sweep file may hold; unknown keys are errors, like in the config tree."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Sweep name: MLflow parent run, results folder <run.storage_path>/<name>.")
    base: str = Field(description="Experiment YAML every trial starts from, relative to the sweep file.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted overrides for every trial.")
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"base": {}}, description="Ordered name -> dotted overrides (table rows)."
    )
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="Dotted name -> values; every combination is crossed with the variants."
    )
    seeds: list[int] = Field(default_factory=lambda: [0], description="Each (variant, grid point) runs once per seed.")
    max_concurrent_trials: int = Field(1, ge=1, description="Trials running at once (each is a whole Train run).")
    max_failures: int = Field(1, ge=0, description="Tune retries of a failed trial; it resumes from its last checkpoint.")
    zero_shot: bool = Field(True, description="Evaluate each pretrained checkpoint on its eval split (zero-shot).")
    downstream: list[StageSpec] = Field(
        default_factory=list, description="Stages run after pretraining, in order: fine-tune, then evaluate."
    )
    trial_cpus: float = Field(
        0.0, ge=0, description="CPUs the trial's driver function holds while its Train workers run (0: memory only)."
    )

    @field_validator("variants")
    @classmethod
    def _some_variants(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not value:
            raise ValueError("list at least one variant (an empty mapping {} runs the base experiment)")
        for name, overrides in value.items():
            if overrides is not None and not isinstance(overrides, dict):
                raise ValueError(f"{name}: overrides must be a mapping of dotted names to values")
        return {name: overrides or {} for name, overrides in value.items()}

    @field_validator("grid")
    @classmethod
    def _non_empty_axes(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in value.items():
            if not values:
                raise ValueError(f"{key}: a grid axis needs at least one value")
        return value

    @field_validator("downstream")
    @classmethod
    def _distinct_stages(cls, value: list[StageSpec]) -> list[StageSpec]:
        names = [stage.name for stage in value]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be distinct, got {names}")
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int]) -> list[int]:
        if not value or len(set(value)) != len(value):
            raise ValueError(f"need one or more distinct seeds, got {value}")
        return value


@dataclass
class Trial:
    """One Tune trial: a variant at one grid point and seed, and its full dotted overrides."""

    key: str  # unique, filesystem-safe: run folder and trial name
    variant: str
    seed: int
    point: dict[str, Any] = field(default_factory=dict)  # this trial's grid values
    overrides: dict[str, Any] = field(default_factory=dict)  # spec <- variant <- grid point <- seed <- CLI

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "variant": self.variant, "seed": self.seed, "point": self.point, "overrides": self.overrides}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Trial":
        return cls(**data)


@dataclass
class Sweep:
    """A loaded sweep file: its spec, the base experiment as a dict, and the expanded trials."""

    spec: SweepSpec
    path: Path
    base: dict[str, Any]
    trials: list[Trial]
    stage_bases: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage name -> its experiment

    def config(self, trial: Trial) -> AlbefConfig:
        return trial_config(self.base, trial)

    def stage_config(self, stage: StageSpec, trial: Trial, checkpoint: str | None = None) -> AlbefConfig:
        """The stage's validated config for ``trial``: its experiment, its overrides, the trial's seed.

        ``checkpoint`` (the trial's pretrained weights) becomes ``model.checkpoint``.
        """
        data = yaml.safe_load(yaml.safe_dump(self.stage_bases[stage.name]))
        try:
            for key, value in {**stage.overrides, "seed": trial.seed, "model.checkpoint": checkpoint}.items():
                set_dotted(data, key, value)
            cfg = build_config(data)
        except ConfigError as err:
            raise ConfigError(f"downstream {stage.name}: {err}") from None
        pretrain = self.config(trial)
        if cfg.model.size != pretrain.model.size:
            raise ConfigError(
                f"downstream {stage.name}: model.size {cfg.model.size!r} differs from the pretrained "
                f"{pretrain.model.size!r}"
            )
        return cfg


def table_columns(sweep: Sweep) -> list[tuple[str, str]]:
    """The comparison table's columns, ``(MLflow metric key, header)``: the downstream stages'
    headline metrics in the sweep file's order (the paper's Table 1 columns), then zero-shot."""
    columns = []
    first = sweep.trials[0]
    for stage in sweep.spec.downstream:
        spec = get_task(sweep.stage_config(stage, first).task)
        columns += [(f"{stage.name}/{key}", f"{stage.name} {title}") for key, title in spec.columns]
    if sweep.spec.zero_shot:
        spec = get_task(sweep.config(first).task)
        columns += [(f"{ZERO_SHOT}/{key}", f"zero-shot {title}") for key, title in spec.columns]
    return columns


def load_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as err:
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {_message(e)}" for e in err.errors())
        raise ConfigError(f"{path}: {where}") from None


def _message(error: dict) -> str:
    return "unknown key" if error["type"] == "extra_forbidden" else error["msg"].removeprefix("Value error, ")


def slug(text: str) -> str:
    """A filesystem- and Tune-safe form of a variant name (``ITC+MLM+ITM_hard`` stays readable)."""
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "_", text).strip("_") or "variant"


def _point_label(point: dict[str, Any]) -> str:
    return ",".join(f"{key.split('.')[-1]}={value}" for key, value in point.items())


def expand(spec: SweepSpec, cli_overrides: list[str] | tuple[str, ...] = ()) -> list[Trial]:
    """Every (variant, grid point, seed) in file order; the CLI's ``a.b=c`` apply to all of them."""
    cli = dict(parse_override(text) for text in cli_overrides)
    axes = list(spec.grid)
    points = [dict(zip(axes, values)) for values in itertools.product(*(spec.grid[a] for a in axes))]
    trials = []
    for variant, variant_overrides in spec.variants.items():
        for point in points:
            for seed in spec.seeds:
                overrides = {**spec.overrides, **variant_overrides, **point, "seed": seed, **cli}
                label = slug(variant) + (f"-{slug(_point_label(point))}" if point else "")
                trials.append(Trial(f"{label}-seed{seed}", variant, seed, point, overrides))
    keys = [t.key for t in trials]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ConfigError(f"variants: two trials would share the folder {dup!r}; rename a variant")
    return trials


def trial_config(base: dict[str, Any], trial: Trial) -> AlbefConfig:
    """The trial's validated config; an error names the variant (and grid point) and the field."""
    data = yaml.safe_load(yaml.safe_dump(base))  # deep copy of plain data
    where = trial.variant + (f" [{_point_label(trial.point)}]" if trial.point else "")
    try:
        for key, value in trial.overrides.items():
            set_dotted(data, key, value)
        return build_config(data)
    except ConfigError as err:
        raise ConfigError(f"variant {where}: {err}") from None


def load_sweep(path: str | Path, cli_overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Read a sweep file and its base experiment, expand it and validate every trial's config."""
    path = Path(path)
    spec = load_spec(path)
    base = load_yaml(path.parent / spec.base)
    trials = expand(spec, cli_overrides)
    stage_bases = {stage.name: load_yaml(path.parent / stage.experiment) for stage in spec.downstream}
    sweep = Sweep(spec, path.resolve(), base, trials, stage_bases)
    for trial in trials:
        trial_config(base, trial)
        for stage in spec.downstream:
            sweep.stage_config(stage, trial)
    return sweep
