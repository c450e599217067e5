"""cluster.yaml passes Ray's own cluster-launcher schema validation (offline)."""

import copy
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster.yaml"


def _validate(cfg):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_cluster_yaml_is_valid():
    cfg = yaml.safe_load(CLUSTER.read_text())
    _validate(cfg)
    workers = cfg["available_node_types"]["gpu_worker"]
    assert workers["resources"]["GPU"] == 8 and workers["node_config"]["InstanceType"] in ("p4d.24xlarge", "p5.48xlarge")
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # reached by port-forwarding, not exposed
    assert any("pip install" in c and "albef-ray" in c for c in cfg["setup_commands"])


def test_validation_really_rejects_a_broken_file():
    cfg = yaml.safe_load(CLUSTER.read_text())
    cfg["available_node_types"]["gpu_worker"]["max_workers"] = "eight"
    with pytest.raises(Exception):
        _validate(cfg)
