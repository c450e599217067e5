"""The GPU suite's Markdown report from its JSON (``benchmarks/gpu_suite.py``); no torch needed.

Every table tolerates missing parts and missing fields: a part that failed or timed out after
saving a partial result shows it, and every part has its row in the last table, with the reason.
"""

from __future__ import annotations

STEP_PARTS = ("step_b64", "step_max", "official_b64", "compile_b64")
PHASES = (("forward", "forward"), ("backward", "backward"), ("optimizer", "optimizer"), ("ema", "EMA"),
          ("enqueue", "enqueue"), ("data_wait", "data wait"), ("other", "other"))


def fmt(value, spec: str = ".3g", missing: str = "–") -> str:
    """A number formatted with ``spec``; strings as they are; None as ``missing``."""
    if value is None:
        return missing
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec)


def pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _ok(report: dict, name: str) -> dict | None:
    """The part's result: final, or partial when it failed or timed out after saving some."""
    return (report.get("parts", {}).get(name) or {}).get("result")


def _mem(r: dict) -> str:
    if "peak_allocated_gb" in r:
        return f"{r['peak_allocated_gb']:.1f} ({fmt(r.get('peak_reserved_gb'), '.1f')} reserved)"
    return f"{fmt(r.get('peak_rss_gb'), '.2f')} RSS"


def step_tables(report: dict) -> list[str]:
    rows, brows = [], []
    for name in STEP_PARTS:
        r = _ok(report, name)
        if not r:
            continue
        peak = r.get("measured_peak_tflops")
        rows.append([name, r.get("impl", "–"), f"{r.get('size')} {r.get('image_res')} px", fmt(r.get("batch"), "d"),
                     r.get("precision", "–"), fmt(r.get("compile")), fmt(r.get("samples_per_s"), ".1f"),
                     fmt(r.get("s_per_step"), ".4f"), _mem(r), fmt((r.get("flops_per_step") or 0) / 1e12, ".2f"),
                     pct(r.get("mfu_nominal")), f"{pct(r.get('mfu_measured'))} of {fmt(peak, '.0f')}"])
        b = r.get("breakdown")
        if b:
            phases = b.get("phases", {})
            device = any((v or {}).get("device_ms") for v in phases.values())
            unit = "device_ms" if device else "cpu_ms"
            cells = [fmt((phases.get(k) or {}).get(unit), ".1f") for k, _ in PHASES]
            total = b.get("step_device_ms" if device else "step_cpu_ms")
            brows.append([name, "kernels" if device else "CPU"] + cells + [fmt(total, ".1f"),
                         fmt(r.get("s_per_step", 0) * 1000, ".1f"), b.get("source", "–")])
    lines = []
    if rows:
        lines += ["## Training step", ""] + _table(
            ["part", "impl", "model", "batch", "precision", "compile", "samples/s", "s/step", "peak GB",
             "TFLOP/step", "MFU (989)", "MFU (measured)"], rows) + [""]
        lines.append("FLOPs: `torch.utils.flop_counter` over one eager step (forward, momentum forward, "
                     "backward); MFU = FLOPs / s/step / peak. Compile time is in `first_step_s` (JSON).")
        syncs = [(name, _ok(report, name).get("host_syncs_per_step")) for name in STEP_PARTS if _ok(report, name)]
        for name, s in syncs:
            if s:
                kinds = "; ".join(k.replace("|", "/")[:80] for k in s.get("kinds", []))
                lines.append(f"Host syncs in one step of `{name}` (CUDA sync debug mode): {s['count']}"
                             + (f" ({kinds})" if kinds else ""))
        lines.append("")
    if brows:
        lines += ["## Step breakdown (ms per step, from the profiler)", ""] + _table(
            ["part", "time"] + [label for _, label in PHASES] + ["sum", "wall (unprofiled)", "ranges"], brows) + [""]
        lines.append("`kernels`: GPU kernel time attributed to the innermost `albef.*` range open when it was "
                     "launched (EMA is inside forward and not counted twice); `other`: the rest of the step "
                     "(grad norm, finiteness checks, metric reads). Wall minus sum is GPU idle time.")
        lines.append("")
    return lines


def max_batch_table(report: dict) -> list[str]:
    r = _ok(report, "max_batch")
    if not r:
        return []
    rows = []
    for c in r.get("candidates", []):
        note = c.get("oom") or c.get("error") or c.get("skipped") or ""
        rows.append([fmt(c.get("batch"), "d"), fmt(c.get("samples_per_s"), ".1f"), fmt(c.get("s_per_step"), ".4f"),
                     _mem(c) if "s_per_step" in c else "–", note.replace("|", "/")[:120]])
    return [f"## Largest batch: {fmt(r.get('largest_fitting'), 'd')} (search stopped by {r.get('stopped_by')}, "
            f"{fmt(r.get('search_s'), '.0f')} s)", ""] + _table(["batch", "samples/s", "s/step", "peak GB", "note"], rows) + [""]


def retrieval_table(report: dict) -> list[str]:
    r = _ok(report, "retrieval_1k")
    if not r:
        return []
    per_query = r.get("per_query_s")
    return ["## Retrieval evaluation", ""] + _table(
        ["model", "images x captions", "k_test", "precision", "batched s", "embedding + ITC s", "per-query s", "speed-up"],
        [[f"{r.get('size')} {r.get('image_res')} px", f"{r.get('images')} x {r.get('captions')}", fmt(r.get("k_test"), "d"),
          r.get("precision", "–"), fmt(r.get("batched_s"), ".2f"), fmt(r.get("embed_itc_s"), ".2f"),
          fmt(per_query, ".2f"), fmt(r.get("speedup"), ".2f")]]) + [""]


def data_table(report: dict) -> list[str]:
    r = _ok(report, "data")
    if not r:
        return []
    p, f, m = r.get("pipeline", {}), r.get("fed", {}), r.get("in_memory", {})
    return [f"## Ray Data -> train_step ({r.get('ray_cpus')} CPUs, {r.get('rows')} JPEGs "
            f"{'x'.join(str(v) for v in r.get('jpeg_size', []))}, {fmt(r.get('jpeg_kb'), '.0f')} KB each)", ""] + _table(
        ["pipeline alone rows/s: epoch / after start-up", "first batch s", "fed rows/s", "step on memory samples/s",
         "data wait", "GPU idle (est.)", "GPU waits for data"],
        [[f"{fmt(p.get('rows_per_s_whole_epoch'), '.0f')} / {fmt(p.get('rows_per_s'), '.0f')}",
          fmt(p.get("first_batch_s"), ".1f"), fmt(f.get("rows_per_s"), ".0f"),
          fmt(m.get("samples_per_s"), ".0f"), pct(f.get("data_wait_frac")), pct(f.get("gpu_idle_frac_est")),
          fmt(r.get("gpu_waits"))]]) + [""]


def ray_train_table(report: dict) -> list[str]:
    r = _ok(report, "ray_train")
    if not r:
        return []
    return [f"## Ray Train (1 worker) vs plain loop ({r.get('size')} b{r.get('batch')}, steps "
            f"{r.get('warmup_steps')}-{r.get('steps')})", ""] + _table(
        ["plain s/step", "Ray Train s/step", "overhead", "Ray data wait", "fit wall s"],
        [[fmt(r.get("plain_s_per_step"), ".4f"), fmt(r.get("ray_s_per_step"), ".4f"), pct(r.get("overhead")),
          pct(r.get("ray_data_wait_frac")), fmt(r.get("ray_fit_wall_s"), ".0f")]]) + [""]


def env_line(report: dict) -> str:
    r = _ok(report, "env") or {}
    bits = [r.get("device_name") or ("CPU" if r else "device unknown")]
    if r.get("memory_gb"):
        bits.append(f"{r['memory_gb']:.0f} GB")
    if r.get("matmul"):
        bits.append(f"{r['matmul']['dtype']} {r['matmul']['n']}^3 matmul {r['matmul']['tflops']:.3g} TFLOP/s")
    if r.get("copy_tb_s"):
        bits.append(f"copy {r['copy_tb_s']:.2f} TB/s")
    if r.get("torch"):
        bits.append(f"torch {r['torch']}, {r.get('cpus')} CPUs")
    return ", ".join(bits)


def status_table(report: dict) -> list[str]:
    rows = []
    for name, part in report.get("parts", {}).items():
        note = part.get("reason") or part.get("error") or ""
        if part.get("status") != "ok" and part.get("result"):
            note += " (what it measured before is in the tables above)"
        rows.append([name, part.get("title", ""), part.get("status", "?"), fmt(part.get("wall_s"), ".0f"),
                     note.replace("|", "/")[:200]])
    return ["## Parts", ""] + _table(["part", "what", "status", "wall s", "note"], rows) + [""]


def markdown(report: dict) -> str:
    suite = report.get("suite", {})
    lines = [f"# GPU suite: {env_line(report)}", "",
             f"Mode: **{suite.get('mode', '?')}**; started {suite.get('started', '?')}, "
             f"{fmt(suite.get('elapsed_s'), '.0f')} s of a {fmt(suite.get('budget_s'), '.0f')} s budget.", ""]
    if suite.get("mode", "").startswith("rehearsal"):
        lines += ["> Rehearsal: every part on this CPU with albef_tiny and small data, to prove the code paths "
                  "and the report; the numbers are not results.", ""]
    for section in (step_tables, max_batch_table, retrieval_table, data_table, ray_train_table, status_table):
        lines += section(report)
    return "\n".join(lines)
