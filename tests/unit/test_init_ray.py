"""init_ray: how a locally started cluster is configured (ray.init itself is faked)."""

import ray

from albef_ray.config import build_config
from albef_ray.launch import common

ENV = "RAY_idle_worker_killing_time_threshold_ms"


def _fake_init(monkeypatch, environ):
    monkeypatch.setattr(common.os, "environ", environ)  # a dict: the test leaves the real one alone
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    return calls


def test_a_started_cluster_keeps_idle_workers_for_the_set_time(monkeypatch):
    environ = {}
    calls = _fake_init(monkeypatch, environ)
    common.init_ray(build_config({}))
    assert calls == [{"address": None, "log_to_driver": True}]
    assert int(environ[ENV]) == common.IDLE_WORKER_KEEP_S * 1000 > 1000  # Ray's default is 1000
    assert environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"  # one machine is never drained


def test_a_value_the_user_set_wins(monkeypatch):
    environ = {ENV: "2500"}
    calls = _fake_init(monkeypatch, environ)
    common.init_ray(build_config({"run": {"address": "ray://head:10001"}}))
    assert calls == [{"address": "ray://head:10001", "log_to_driver": True}]
    assert environ == {ENV: "2500"}  # nor is the preemption watcher of a joined cluster turned off


def test_a_job_on_a_running_cluster_keeps_its_preemption_watcher(monkeypatch):
    environ = {"RAY_ADDRESS": "http://head:8265"}  # as under `ray job submit`
    _fake_init(monkeypatch, environ)
    common.init_ray(build_config({}))
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in environ


def test_a_set_preemption_switch_wins(monkeypatch):
    environ = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}
    _fake_init(monkeypatch, environ)
    common.init_ray(build_config({}))
    assert environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"
