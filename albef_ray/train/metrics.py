"""Per-step metrics averaged over a logging window, for the local loop and Ray workers alike."""

from __future__ import annotations

from collections.abc import Mapping


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
        """The window's summary (empty when no step was added); starts a new window."""
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
