"""Per-step metrics averaged over a logging window, for the local loop and Ray workers alike."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def materialise(rows: Sequence[dict[str, object]]) -> list[dict[str, object]]:
    """The rows with every tensor value replaced by its float, in one host sync per device."""
    by_device: dict[torch.device, list[tuple[dict, str, torch.Tensor]]] = {}
    for row in rows:
        for k, v in row.items():
            if isinstance(v, torch.Tensor):
                by_device.setdefault(v.device, []).append((row, k, v))
    for entries in by_device.values():
        values = torch.stack([v.detach().float().reshape(()) for _, _, v in entries]).tolist()
        for (row, k, _), value in zip(entries, values):
            row[k] = value
    return list(rows)


class MetricWindow:
    """Collects per-step metric dicts; :meth:`flush` returns their window summary.

    Counters (rows skipped or dropped) are summed, the learning rate is its value at the
    window's last step, everything else is averaged over the steps that reported it.
    """

    COUNTERS = ("skipped", "dropped_rows")
    LAST = ("lr",)

    def __init__(self):
        self.rows: list[Mapping[str, float]] = []

    def add(self, metrics: Mapping[str, float]) -> None:
        self.rows.append(metrics)

    def flush(self) -> dict[str, float]:
        """The window's summary (empty when no step was added); starts a new window.

        Tensor values (a step's metrics left on the device) are read here, in one host sync.
        """
        self.rows = materialise([dict(r) for r in self.rows])
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        out = {}
        for k in keys:
            vals = [float(r[k]) for r in self.rows if k in r]
            if k in self.COUNTERS:
                out[k] = sum(vals)
            elif k in self.LAST:
                out[k] = vals[-1]
            else:
                out[k] = sum(vals) / len(vals)
        self.rows = []
        return out


class NonFiniteRun:
    """Counts skipped (non-finite) steps in a row on the device; read at logging intervals.

    :meth:`add` takes a step's ``skipped`` (0-d tensor or float, 1.0 = skipped) without a host
    sync; :meth:`read` returns the current run's length and the longest run since the last
    read (what ``train.max_nonfinite_steps`` is checked against), in one sync.
    """

    def __init__(self, current: int = 0):
        self.current: torch.Tensor | float = float(current)
        self.worst: torch.Tensor | float = float(current)

    def add(self, skipped: torch.Tensor | float) -> None:
        self.current = (self.current + skipped) * skipped  # +1 while skipped, 0 after a good step
        if isinstance(self.current, torch.Tensor):
            worst = torch.as_tensor(self.worst, dtype=self.current.dtype, device=self.current.device)
            self.worst = torch.maximum(self.current, worst)
        else:
            self.worst = max(self.worst, self.current)

    def read(self) -> tuple[int, int]:
        """(current run, longest run since the last read); the longest restarts at the current."""
        current, worst = materialise([{"c": self.current, "w": self.worst}])[0].values()
        self.current = self.worst = float(current)
        return int(current), int(worst)
