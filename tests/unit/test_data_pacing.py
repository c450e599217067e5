"""Ray Data's scheduling loop is paced while it has nothing to wait for (launch/data.py)."""

import ray.data

from albef_ray.launch import data as launch_data
from albef_ray.launch.data import IdleLoopPause, pace_idle_scheduling


class FakeClock:
    """perf_counter / sleep of a loop whose steps take the times the test chooses."""

    def __init__(self):
        self.now = 100.0
        self.slept = []

    def perf_counter(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds


def test_a_step_that_returned_at_once_is_followed_by_a_pause_and_a_waiting_step_is_not(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(launch_data, "time", clock)
    pause = IdleLoopPause()
    pause.before_execution_starts(None)

    clock.now += 0.0001  # no task running: ray.wait returned at once
    pause.on_execution_step(None)
    assert clock.slept == [IdleLoopPause.PAUSE_S]

    clock.now += 0.05  # tasks running: the step blocked in ray.wait
    pause.on_execution_step(None)
    assert clock.slept == [IdleLoopPause.PAUSE_S]

    for _ in range(100):  # a spinning loop: every step paused, so at most 1 / PAUSE_S steps a second
        clock.now += 0.0002
        pause.on_execution_step(None)
    assert clock.slept == [IdleLoopPause.PAUSE_S] * 101
    assert 101 / (clock.now - 100.0) <= 1 / IdleLoopPause.PAUSE_S


def test_the_first_step_is_measured_from_the_start_of_execution(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(launch_data, "time", clock)
    pause = IdleLoopPause()
    clock.now += 5.0  # built long before it runs
    pause.before_execution_starts(None)
    clock.now += 0.5
    pause.on_execution_step(None)
    assert clock.slept == []


def test_registered_once_on_a_data_context():
    context = ray.data.DataContext()
    pace_idle_scheduling(context)
    pace_idle_scheduling(context)
    assert context.custom_execution_callback_classes == [IdleLoopPause]
    assert context.execution_callback_classes.count(IdleLoopPause) == 1  # what the planner instantiates
