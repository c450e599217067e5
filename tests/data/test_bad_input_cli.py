"""Bad checkpoints, datasets and MLflow stores: one line naming the problem, exit 2, nothing created.

Data paths are checked before any model or tokenizer is loaded (a hub tokenizer without network
retries for a minute before failing about the connection).
"""

import re
import shutil
from pathlib import Path

import pytest
import torch

from albef_ray.cli import main
from albef_ray.data.manifest import dataset_problem
from albef_ray.data.schema import MANIFEST, PROGRESS_DIR
from albef_ray.synth.benchmark import SynthConfig, build_synth

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "experiments" / "demo_cpu.yaml")
FINETUNE = str(ROOT / "experiments" / "finetune_synth.yaml")


class NotATensor:
    pass


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input") / "ds"
    build_synth(root, SynthConfig(seed=3, train=4, val=2, test=4, image_size=32, eval_captions=2), progress=False)
    return root


@pytest.fixture
def interrupted(synth, tmp_path):
    """A build killed before its manifest: shards of part of the data and the progress folder."""
    root = tmp_path / "interrupted"
    shutil.copytree(synth, root)
    (root / MANIFEST).unlink()
    (root / PROGRESS_DIR).mkdir()
    return root


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if a model or a tokenizer is loaded."""
    def forbidden(*args, **kwargs):
        raise AssertionError("loaded a model or tokenizer before checking the data paths")

    monkeypatch.setattr("albef_ray.eval.checkpoint.load_eval_model", forbidden)
    monkeypatch.setattr("albef_ray.data.collate.load_tokenizer", forbidden)
    monkeypatch.setattr("albef_ray.model.loading.build_model_from_config", forbidden)


def _eval(synth, tmp_path, *extra):
    overrides = [f"data.shards=[{synth}]", f"data.tokenizer={synth}", "eval.k_test=4", f"run.storage_path={tmp_path / 'runs'}"]
    return main(["eval", "retrieval", "--config", DEMO, *overrides, *extra])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if not re.match(r"\d{4}/\d\d/\d\d .* INFO mlflow", line)]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("kind, expected", [
    ("empty", "{path}: empty"),
    ("random", "{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)"),
    ("custom", f"{{path}}: not a weights-only checkpoint (it pickles {__name__}.NotATensor, which a weights-only load refuses)"),
])
def test_eval_of_a_bad_checkpoint_exits_2_with_one_line(synth, tmp_path, capsys, kind, expected):
    path = tmp_path / "model.pth"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(bytes(range(1, 256)) * 8)
    else:
        torch.save({"model": {}, "config": NotATensor()}, path)
    assert _eval(synth, tmp_path, "--checkpoint", str(path)) == 2
    line = _one_line(capsys)
    assert line == "albef-ray: eval error: " + expected.format(path=path)
    assert "weights_only" not in line
    assert not (tmp_path / "runs").exists()  # nothing logged


def test_a_bad_model_checkpoint_in_pretrain_local_exits_2(tmp_path, capsys):
    path = tmp_path / "model.pth"
    path.write_bytes(b"")
    assert main(["pretrain", "--local", "--config", DEMO, f"model.checkpoint={path}", "train.max_steps=1"]) == 2
    assert _one_line(capsys) == f"albef-ray: checkpoint error: {path}: empty"


def test_eval_refuses_an_unfinished_build_before_loading_anything(interrupted, tmp_path, capsys, nothing_loads):
    assert _eval(interrupted, tmp_path, f"data.tokenizer={interrupted / 'tokenizer'}") == 2
    assert _one_line(capsys) == (
        f"albef-ray: config error: data.shards: {interrupted}: no {MANIFEST}: its build did not finish "
        "(run the same `albef-ray data build` again)"
    )


def test_eval_names_missing_shards_before_the_default_hub_tokenizer(synth, tmp_path, capsys, nothing_loads):
    missing = tmp_path / "nosuch"
    # data.tokenizer keeps its default, a hub name: loading it first would retry the network
    assert main(["eval", "retrieval", "--config", DEMO, f"eval.shards=[{missing}]"]) == 2
    assert _one_line(capsys) == f"albef-ray: config error: eval.shards: {missing} does not exist"
    assert _eval(synth, tmp_path, f"data.tokenizer={tmp_path / 'tok'}") == 2
    assert _one_line(capsys) == f"albef-ray: config error: data.tokenizer: {tmp_path / 'tok'} does not exist"


def test_eval_checks_only_the_shards_it_reads(synth, tmp_path, capsys, monkeypatch):
    """With eval.shards set, a training data.shards elsewhere does not block evaluation."""
    seen = {}

    def fake_evaluate(cfg, weights):
        seen["eval.shards"] = cfg.eval.shards
        raise OSError("stop here")

    monkeypatch.setattr("albef_ray.eval.checkpoint.evaluate_checkpoint", fake_evaluate)
    code = main(["eval", "retrieval", "--config", DEMO, f"data.shards=[{tmp_path / 'train_elsewhere'}]",
                 f"eval.shards=[{synth}]", f"data.tokenizer={synth}"])
    assert code == 2 and seen["eval.shards"] == [str(synth)]
    assert _one_line(capsys) == "albef-ray: eval error: stop here"


def test_the_split_reader_refuses_an_unfinished_build(interrupted):
    from albef_ray.config import ConfigError, load_config
    from albef_ray.eval.split import load_split

    with pytest.raises(ConfigError, match=f"eval.shards: {interrupted}: no {MANIFEST}: its build did not finish"):
        load_split([str(interrupted)], "test", load_config(DEMO))


def test_dataset_problem(synth, interrupted, tmp_path):
    assert dataset_problem(synth) is None and dataset_problem("s3://bucket/ds") is None
    assert dataset_problem(tmp_path / "nosuch") == f"{tmp_path / 'nosuch'} does not exist"
    assert "its build did not finish" in dataset_problem(interrupted)
    (tmp_path / "empty").mkdir()
    assert dataset_problem(tmp_path / "empty") == f"{tmp_path / 'empty'}: no {MANIFEST} and no Parquet files (not a dataset)"
    plain = tmp_path / "plain" / "test"
    plain.mkdir(parents=True)
    shutil.copy(next((synth / "test").glob("*.parquet")), plain / "part-00000.parquet")
    assert dataset_problem(tmp_path / "plain") is None  # a plain folder of Parquet files is still read


def test_pretrain_and_finetune_refuse_bad_shards_before_ray(interrupted, tmp_path, capsys, nothing_loads):
    missing = tmp_path / "nosuch"
    assert main(["pretrain", "--config", DEMO, f"data.shards=[{missing}]"]) == 2
    assert _one_line(capsys) == f"albef-ray: config error: data.shards: {missing} does not exist"
    assert main(["pretrain", "--config", DEMO, f"data.shards=[{interrupted}]"]) == 2
    assert "its build did not finish" in _one_line(capsys)
    assert main(["finetune", "retrieval", "--config", FINETUNE, f"data.shards=[{interrupted}]",
                 f"data.tokenizer={interrupted / 'tokenizer'}", "model.vit_init=null", "model.bert_init=null"]) == 2
    assert "data.shards" in _one_line(capsys)


def test_pretrain_local_never_ignores_data_shards(synth, tmp_path, capsys):
    missing = tmp_path / "nosuch"
    assert main(["pretrain", "--local", "--config", DEMO, f"data.shards=[{missing}]"]) == 2
    assert _one_line(capsys) == f"albef-ray: config error: data.shards: {missing} does not exist"
    assert main(["pretrain", "--local", "--config", DEMO, f"data.shards=[{synth}]"]) == 2
    line = _one_line(capsys)
    assert line.startswith("albef-ray: config error: data.shards: pretrain --local trains on generated tensors only")
    assert str(synth) in line and "drop --local" in line


def test_compare_of_an_unknown_sweep_creates_no_store(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["compare", "--sweep", "nosuch"]) == 2
    line = _one_line(capsys)
    assert line.startswith("albef-ray: compare error: no MLflow store at sqlite:///") and "mlflow.db" in line
    assert list(tmp_path.iterdir()) == []  # no runs/, no mlflow.db, no mlruns/


def test_compare_of_an_unknown_or_non_sweep_run_id_exits_2(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    trial = client.create_run(client.create_experiment("albef-ray"), tags={"sweep_role": "trial"}).info.run_id
    out = tmp_path / "out"
    assert main(["compare", "--run-id", "0123456789abcdef", "--tracking-uri", uri, "--out", str(out)]) == 2
    assert _one_line(capsys) == f"albef-ray: compare error: no MLflow run '0123456789abcdef' in {uri}"
    assert main(["compare", "--run-id", trial, "--tracking-uri", uri, "--out", str(out)]) == 2
    assert _one_line(capsys) == f"albef-ray: compare error: MLflow run {trial} is not a sweep's parent run (tag sweep_role is not 'parent')"
    assert not out.exists()
    assert main(["compare", "--sweep", "nosuch", "--tracking-uri", uri]) == 2
    assert _one_line(capsys) == "albef-ray: compare error: no MLflow parent run for sweep 'nosuch'"
