"""Step breakdown from the profiler for the GPU suite (``benchmarks/gpu_step.py``).

Named ``torch.profiler.record_function`` ranges split a step. When the training code has them
(``albef.forward`` / ``albef.backward`` / ``albef.optimizer`` in ``train/loop.py``, ``albef.ema``
/ ``albef.enqueue`` in ``model/momentum.py``) they are used as they are; for any that are
missing, :func:`add_missing_ranges` wraps the same calls in the same names. Device (kernel)
time is attributed to the innermost range open on the main thread when the kernel was
launched, so backward kernels launched from autograd's device thread count as backward.
"""

from __future__ import annotations

import inspect

PHASES = ("forward", "backward", "optimizer", "ema", "enqueue", "data_wait")


def attribute(ranges: list[tuple[str, float, float]], launches: list[tuple[float, float]]) -> dict[str, dict]:
    """Per range name: exclusive CPU time and attributed device time, in the input's unit.

    Args:
        ranges: ``(name, start, end)`` of the named ranges (main thread; nested or disjoint).
        launches: ``(cpu_launch_time, device_duration)`` of every kernel.

    Returns:
        ``{name: {"cpu": span minus nested named spans, "device": kernels launched while it was
        the innermost open range, "count": occurrences}}``; kernels outside every range go to
        ``"(none)"``.
    """
    import bisect

    ranges = sorted(ranges, key=lambda r: (r[1], -r[2]))
    out: dict[str, dict] = {}
    for name, start, end in ranges:
        d = out.setdefault(name, {"cpu": 0.0, "device": 0.0, "count": 0})
        d["cpu"] += end - start
        d["count"] += 1
    # subtract each range from its innermost enclosing range's CPU time
    stack: list[tuple[str, float, float]] = []
    for r in ranges:
        while stack and stack[-1][2] <= r[1]:
            stack.pop()
        if stack:
            out[stack[-1][0]]["cpu"] -= r[2] - r[1]
        stack.append(r)
    starts = [r[1] for r in ranges]
    for t, dur in launches:
        i = bisect.bisect_right(starts, t) - 1
        owner = "(none)"
        while i >= 0:  # the innermost range holding t is the latest-starting one still open at t
            if ranges[i][2] >= t:
                owner = ranges[i][0]
                break
            i -= 1
        out.setdefault(owner, {"cpu": 0.0, "device": 0.0, "count": 0})["device"] += dur
    return out


def breakdown_from_profile(prof, steps: int, source: str) -> dict:
    """Per-step milliseconds of each phase from a ``torch.profiler.profile`` of ``steps`` steps."""
    from torch.autograd import DeviceType

    ranges, launches = [], []
    for e in prof.events():
        if e.device_type != DeviceType.CPU:
            continue
        if e.name.startswith("albef."):
            ranges.append((e.name, e.time_range.start, e.time_range.end))
        for k in getattr(e, "kernels", None) or ():
            launches.append((e.time_range.start, k.duration))
    times = attribute(ranges, launches)
    per = {}
    for name, d in times.items():
        key = name.removeprefix("albef.") if name != "(none)" else "outside"
        per[key] = {"cpu_ms": d["cpu"] / 1000 / steps, "device_ms": d["device"] / 1000 / steps}
    step = per.pop("step", {"cpu_ms": 0.0, "device_ms": 0.0})
    phases = {p: per.pop(p, None) for p in PHASES}
    # what the step range holds outside every named phase: the grad norm, finiteness checks, syncs
    phases["other"] = step
    step_cpu = sum(v["cpu_ms"] for v in phases.values() if v)
    step_device = sum(v["device_ms"] for v in phases.values() if v)
    return {
        "source": source, "profiled_steps": steps, "phases": phases, "unnamed": per,
        "step_cpu_ms": step_cpu, "step_device_ms": step_device,
        "kernels_outside_steps_ms": per.get("outside", {}).get("device_ms", 0.0),
    }


def _ranged(name: str, fn):
    from torch.profiler import record_function

    def wrapper(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)

    return wrapper


def add_missing_ranges(task, optimizer) -> str:
    """Wrap forward / backward / optimizer / EMA / enqueue in ``albef.*`` ranges where the code has none.

    Returns which ranges came from where (``"train_step"`` when the training code had them all).
    """
    import torch

    from albef_ray.model import momentum as momentum_module
    from albef_ray.train import loop as loop_module

    loop_src, mom_src = inspect.getsource(loop_module), inspect.getsource(momentum_module)
    added = []
    if '"albef.forward"' not in loop_src:
        task.forward = _ranged("albef.forward", task.forward)
        added.append("forward")
    if '"albef.backward"' not in loop_src:
        torch.Tensor.backward = _ranged("albef.backward", torch.Tensor.backward)
        added.append("backward")
    if '"albef.optimizer"' not in loop_src:
        optimizer.step = _ranged("albef.optimizer", optimizer.step)
        added.append("optimizer")
    momentum = getattr(task, "momentum", None)
    if momentum is not None and '"albef.ema"' not in mom_src:
        momentum.update = _ranged("albef.ema", momentum.update)
        added.append("ema")
    if momentum is not None and '"albef.enqueue"' not in mom_src:
        momentum.commit = _ranged("albef.enqueue", momentum.commit)
        added.append("enqueue")
    return "train_step" if not added else f"train_step; suite wrappers for {', '.join(added)}"
