"""The ``albef-ray`` command: config show / validate, pretrain, its error handling and dispatch."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from albef_ray.cli import build_parser, main
from albef_ray.cli.common import RESUME_HELP, load

DEMO = str(Path(__file__).resolve().parents[2] / "experiments" / "demo_cpu.yaml")
FINETUNE = str(Path(__file__).resolve().parents[2] / "experiments" / "finetune_synth.yaml")


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "albef_ray", *argv], capture_output=True, text=True, timeout=120)


def test_config_show_applies_overrides(capsys):
    assert main(["config", "show", "optim.lr=2e-4", "train.use_gpu=false"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["optim"]["lr"] == 2e-4
    assert shown["train"]["use_gpu"] is False
    assert shown["momentum"]["queue_size"] == 65536  # untouched default


def test_config_show_with_file_and_override(capsys):
    assert main(["config", "show", "--config", DEMO, "train.max_steps=7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["model"]["size"] == "albef_tiny" and shown["train"]["max_steps"] == 7


def test_config_validate_lists_what_differs(capsys):
    assert main(["config", "validate", "-c", DEMO]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "model.size = 'albef_tiny'" in out and "optim.weight_decay" not in out


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=fast", "optim.lr: Input should be a valid number"),
        ("train.bogus=1", "train.bogus: unknown key"),
        ("nosuch.key=1", "nosuch: unknown key"),
        ("itc.enabled=false", "itm.hard_negatives: "),
        ("momentum.queue_size=1000", "momentum.queue_size: 1000 is not divisible"),
        ("model.size=albef_huge", "model.size: unknown size 'albef_huge'"),
    ],
)
def test_bad_config_exits_nonzero_naming_the_dotted_path(capsys, override, message):
    assert main(["config", "show", override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_key_in_a_file_is_named(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lrr: 1.0e-4\n")
    assert main(["config", "validate", "--config", str(path)]) == 2
    assert "optim.lrr: unknown key" in capsys.readouterr().err


def test_bad_config_in_a_real_process_has_no_traceback():
    proc = _run("config", "show", "train.batch_size=many")
    assert proc.returncode == 2
    assert "train.batch_size" in proc.stderr and "Traceback" not in proc.stderr


def test_help_describes_the_subcommands():
    proc = _run("--help")
    assert proc.returncode == 0
    assert "config" in proc.stdout and "pretrain" in proc.stdout
    proc = _run("pretrain", "--help")
    assert proc.returncode == 0 and "--config" in proc.stdout and "Ray Train" in proc.stdout and "--local" in proc.stdout


def test_pretrain_runs_the_local_loop_and_reports_losses(capsys):
    argv = ["pretrain", "--local", "--config", DEMO, "--no-progress", "train.max_steps=3", "train.log_every_steps=3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "single-process loop on generated" in out
    assert "step 3/3 | loss " in out
    assert "first loss " in out and "last loss " in out


def test_pretrain_needs_steps_per_epoch(capsys):
    assert main(["pretrain", "--local", "--config", DEMO, "train.steps_per_epoch=null"]) == 2
    assert "train.steps_per_epoch: required" in capsys.readouterr().err


def test_pretrain_requires_a_config_file():
    proc = _run("pretrain")
    assert proc.returncode == 2 and "--config" in proc.stderr


@pytest.mark.parametrize(
    "override, message",
    [("optim.grad_accum=3", "optim.grad_accum: train.batch_size=8"), ("data.max_text_len=4", "data.max_text_len: generated captions need 5")],
)
def test_pretrain_config_problems_are_named(capsys, override, message):
    import ray

    assert main(["pretrain", "--config", DEMO, override]) == 2
    assert message in capsys.readouterr().err
    assert not ray.is_initialized()  # rejected before any Ray work


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """``(path, parser)`` of every subcommand parser that has no subcommands of its own."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        yield " ".join(path), parser
    for group in groups:
        for name, sub in group.choices.items():
            yield from _leaves(sub, (*path, name))


def test_every_leaf_subcommand_dispatches_through_func():
    leaves = dict(_leaves(build_parser()))
    assert {
        "config show", "config validate", "pretrain", "data build", "data synth", "data synth-init",
        "sweep", "compare", "eval retrieval", "finetune retrieval",
    } <= set(leaves)
    for name, parser in leaves.items():
        assert callable(parser.get_default("func")), f"{name}: no func default"


@pytest.mark.parametrize(
    "leaf, command",
    [("pretrain", ["pretrain", "--config", DEMO]), ("finetune retrieval", ["finetune", "retrieval", "--config", FINETUNE])],
)
def test_resume_is_the_run_name_for_pretrain_and_finetune_alike(leaf, command):
    parser = build_parser()
    (resume,) = [a for a in dict(_leaves(parser))[leaf]._actions if a.dest == "resume"]
    assert resume.option_strings == ["--resume"] and resume.metavar == "NAME" and resume.help == RESUME_HELP
    assert load(parser.parse_args(command)).run.name is None
    resumed = load(parser.parse_args([*command, "--resume", "run-7", "train.max_steps=2"]))
    assert resumed.run.name == "run-7" and resumed.train.max_steps == 2


def test_pretrain_and_finetune_launch_the_resumed_run(monkeypatch, capsys):
    from types import SimpleNamespace

    launched = {}

    def run_pretrain(cfg, *args, **kwargs):
        launched["pretrain"] = cfg.run.name
        return SimpleNamespace(metrics={})

    def run_finetune(cfg, *args, **kwargs):
        launched["finetune"] = cfg.run.name
        return SimpleNamespace(metrics={}), None  # (Ray result, no best checkpoint)

    monkeypatch.setattr("albef_ray.launch.train.run_pretrain", run_pretrain)
    monkeypatch.setattr("albef_ray.launch.finetune.run_finetune", run_finetune)
    assert main(["pretrain", "--config", DEMO, "--resume", "pre-1"]) == 0
    assert main(["finetune", "retrieval", "--config", FINETUNE, "--resume", "ft-1"]) == 0
    assert launched == {"pretrain": "pre-1", "finetune": "ft-1"}
