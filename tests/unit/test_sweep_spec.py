"""Sweep files and the comparison table: expansion, validation, mean ± std, ordering (no Ray)."""

from pathlib import Path

import pytest
import yaml

from albef_ray.compare import COLUMNS, mean_std, ordering_holds, summarize, to_csv, to_markdown
from albef_ray.config import ConfigError
from albef_ray.sweep import expand, load_spec, load_sweep

ROOT = Path(__file__).resolve().parents[2]
ABLATIONS = sorted((ROOT / "ablations").glob("*.yaml"))


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.name)
def test_every_ablation_file_validates_every_trial(path):
    sweep = load_sweep(path)
    assert sweep.trials and len({t.key for t in sweep.trials}) == len(sweep.trials)
    configs = [sweep.config(t) for t in sweep.trials]
    assert all(c.tracking.enabled for c in configs)


def test_table1_rows_are_the_papers_switches():
    sweep = load_sweep(ROOT / "ablations" / "table1.yaml")
    rows = {t.variant: sweep.config(t) for t in sweep.trials}
    assert list(rows) == ["MLM+ITM", "ITC+MLM+ITM", "ITC+MLM+ITM_hard", "ITC+MLM+ITM_hard+MoD"]
    switches = [(c.itc.enabled, c.itm.hard_negatives, c.mod.itc and c.mod.mlm) for c in rows.values()]
    assert switches == [(False, False, False), (True, False, False), (True, True, False), (True, True, True)]
    assert all(c.mod.alpha == 0.4 for c in rows.values())  # MoD is switched, never alpha


def _spec(tmp_path, **fields):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model": {"size": "albef_tiny"}}))
    spec = {"name": "s", "base": "base.yaml", **fields}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_grid_and_seeds_cross_every_variant_in_file_order(tmp_path):
    path = _spec(
        tmp_path, overrides={"optim.lr": 0.001},
        variants={"b": {"itm.hard_negatives": False}, "a": {}},
        grid={"mod.alpha": [0.0, 0.4], "optim.warmup_steps": [5]}, seeds=[1, 2],
    )
    trials = expand(load_spec(path), ["train.max_steps=3"])
    assert len(trials) == 2 * 2 * 1 * 2
    assert [t.variant for t in trials] == ["b"] * 4 + ["a"] * 4
    assert trials[0].key == "b-alpha=0.0_warmup_steps=5-seed1"
    assert trials[0].overrides == {
        "optim.lr": 0.001, "itm.hard_negatives": False, "mod.alpha": 0.0, "optim.warmup_steps": 5, "seed": 1,
        "train.max_steps": 3,
    }
    sweep = load_sweep(path, ["train.max_steps=3"])
    cfg = sweep.config(sweep.trials[-1])
    assert (cfg.seed, cfg.mod.alpha, cfg.train.max_steps, cfg.optim.lr) == (2, 0.4, 3, 0.001)


@pytest.mark.parametrize(
    ("fields", "overrides", "message"),
    [
        ({"variants": {"bad": {"optim.lrr": 1}}}, [], "variant bad: optim.lrr: unknown key"),
        ({"variants": {"v": {"itc.enabled": False}}}, [], "variant v: itm.hard_negatives: hard negatives"),
        ({"grid": {"mod.alpha": [0.2, 2.0]}}, [], "variant base [alpha=2.0]: mod.alpha:"),
        ({"variants": {"v": {}}}, ["train.batch_size=x"], "variant v: train.batch_size:"),
        ({"seeds": [1, 1]}, [], "seeds: need one or more distinct seeds"),
        ({"grid": {"mod.alpha": []}}, [], "grid: mod.alpha: a grid axis needs at least one value"),
        ({"variant": {}}, [], "variant: unknown key"),
        ({"variants": {"a b": {}, "a_b": {}}}, [], "share the folder"),
    ],
)
def test_bad_trials_fail_before_ray_naming_variant_and_field(tmp_path, fields, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_sweep(_spec(tmp_path, **fields), overrides)
    assert message in str(err.value)


def _trial(variant, seed, r):
    return {"variant": variant, "seed": seed, **{key: r for key, _ in COLUMNS}}


def test_mean_and_sample_std_over_seeds():
    rows = summarize([_trial("b", 0, 10.0), _trial("a", 0, 1.0), _trial("b", 1, 14.0), _trial("a", 3, 3.0)], ["a", "b"])
    assert [r.variant for r in rows] == ["a", "b"] and rows[1].seeds == [0, 1]
    assert rows[0].stats["r_mean"].mean == 2.0 and rows[0].stats["r_mean"].std == pytest.approx(2**0.5)
    assert rows[1].stats["txt_r1"].mean == 12.0 and rows[1].stats["txt_r1"].std == pytest.approx(8**0.5)
    assert mean_std([5.0]).std is None and mean_std([]).format() == "–"


def test_markdown_and_csv_tables():
    rows = summarize([_trial("only", 0, 50.0), _trial("pair", 0, 60.0), _trial("pair", 1, 62.0)], ["pair", "only"])
    md = to_markdown(rows).splitlines()
    assert md[0] == "| variant | seeds | TR@1 | TR@5 | TR@10 | IR@1 | IR@5 | IR@10 | mean |"
    assert md[2].startswith("| pair | 2 | 61.00 ± 1.41 |") and md[3].startswith("| only | 1 | 50.00 |")
    csv_lines = to_csv(rows).splitlines()
    assert csv_lines[0].startswith("variant,seeds,txt_r1_mean,txt_r1_std,")
    assert csv_lines[1].startswith("pair,0 1,61.0000,1.4142,") and csv_lines[2].startswith("only,0,50.0000,,")


def test_ordering_verdict_and_missing_metrics():
    up = summarize([_trial("a", 0, 1.0), _trial("b", 0, 1.0), _trial("c", 0, 3.0)], ["a", "b", "c"])
    down = summarize([_trial("a", 0, 2.0), _trial("b", 0, 1.0)], ["a", "b"])
    assert ordering_holds(up) and not ordering_holds(down)
    partial = summarize([_trial("a", 0, 4.0), {"variant": "a", "seed": 1, "r_mean": None}])
    assert partial[0].stats["r_mean"].mean == 4.0 and partial[0].seeds == [0, 1]


# ----------------------------------------------------------------------------- downstream stages


def _staged(tmp_path, stage_base=None, **stage):
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(stage_base or {
        "task": "retrieval", "model": {"size": "albef_tiny"}, "mlm": {"enabled": False}, "mod": {"mlm": False},
    }))
    return _spec(tmp_path, seeds=[3, 4], downstream=[{"name": "retrieval", "experiment": "ft.yaml", **stage}])


def test_a_stage_takes_its_own_experiment_the_trial_seed_and_the_checkpoint(tmp_path):
    from albef_ray.sweep import table_columns

    sweep = load_sweep(_staged(tmp_path, overrides={"optim.lr": 3e-4}))
    stage = sweep.spec.downstream[0]
    cfg = sweep.stage_config(stage, sweep.trials[1], "/ckpt/state.pt")
    assert (cfg.task, cfg.seed, cfg.optim.lr, cfg.model.checkpoint) == ("retrieval", 4, 3e-4, "/ckpt/state.pt")
    assert cfg.itc.enabled and not cfg.mlm.enabled  # the stage's switches, not the variant's
    assert table_columns(sweep) == [
        ("retrieval/txt_r_mean", "retrieval TR"), ("retrieval/img_r_mean", "retrieval IR"),
        ("zeroshot/txt_r_mean", "zero-shot TR"), ("zeroshot/img_r_mean", "zero-shot IR"),
        ("zeroshot/itm_acc", "zero-shot ITM acc"),
    ]


@pytest.mark.parametrize(
    ("stage_base", "stage", "message"),
    [
        ({"task": "retrieval", "model": {"size": "albef_base"}, "mlm": {"enabled": False}, "mod": {"mlm": False}}, {},
         "downstream retrieval: model.size 'albef_base' differs from the pretrained 'albef_tiny'"),
        (None, {"overrides": {"optim.lrr": 1}}, "downstream retrieval: optim.lrr: unknown key"),
        ({"task": "retrieval", "model": {"size": "albef_tiny"}}, {}, "downstream retrieval: mlm.enabled: retrieval"),
        (None, {"name": "zeroshot"}, "not 'zeroshot'"),
        (None, {"experiment": "missing.yaml"}, "missing.yaml does not exist"),
    ],
)
def test_bad_stages_fail_before_ray(tmp_path, stage_base, stage, message):
    with pytest.raises(ConfigError) as err:
        load_sweep(_staged(tmp_path, stage_base, **stage))
    assert message in str(err.value)


def test_adjacent_rows_differ_by_more_than_two_standard_errors_or_not():
    from albef_ray.compare import adjacent_differences

    columns = [("a/x", "x")]
    rows = summarize(
        [{"variant": "low", "seed": s, "a/x": v} for s, v in enumerate([1.0, 2.0, 3.0])]
        + [{"variant": "high", "seed": s, "a/x": v} for s, v in enumerate([10.0, 12.0, 14.0])]
        + [{"variant": "same", "seed": s, "a/x": v} for s, v in enumerate([9.0, 13.0, 17.0])],
        ["low", "high", "same"], columns,
    )
    first, second = adjacent_differences(rows, columns)
    # low: mean 2, s 1; high: mean 12, s 2 -> SE = sqrt(1/3 + 4/3) = 1.291
    assert first.diff == pytest.approx(10.0) and first.se == pytest.approx((5 / 3) ** 0.5)
    assert first.significant and "exceeds 2 SE" in first.format()
    # same: mean 13, s 4 -> SE = sqrt(4/3 + 16/3) = 2.582 > 1 / 2
    assert second.diff == pytest.approx(1.0) and second.significant is False and "within 2 SE" in second.format()
    single = adjacent_differences(summarize([{"variant": "a", "seed": 0, "a/x": 1.0},
                                             {"variant": "b", "seed": 0, "a/x": 2.0}], None, columns), columns)
    assert single[0].significant is None and "one seed" in single[0].format()
    md = to_markdown(rows, columns=columns)
    assert "| variant | seeds | x |" in md and "| high | 3 | 12.00 ± 2.00 |" in md
    assert to_csv(rows, columns).splitlines()[0] == "variant,seeds,a/x_mean,a/x_std"
