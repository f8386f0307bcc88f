"""bench/ plugin: collect `bench_*.py`, the `--op-timing` option, and the attention-op summary.

At the end of a session that ran `bench_attention_ops.py`, every op gets
extra_info["speedup_vs_dense"] = dense median / op median (same layout, keys and queries; written before
pytest-benchmark saves its JSON) and a table (per shape: dense, flex and gather median microseconds and
their speedups) is printed after the run.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--op-timing",
        dest="op_timing",
        choices=("auto", "graph", "eager"),
        default=None,
        help="bench_attention_ops timing: graph (CUDA-graph replay; the default on CUDA) or eager (wall clock "
        "of a Python call + synchronize; the default on CPU). Env FOCUSDLLM_OP_TIMING sets the same.",
    )


def pytest_collect_file(parent, file_path):
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


_SHAPE = ("layout", "keys", "queries")


def _op_rows(benchmarks) -> list[dict]:
    """Per-op {shape..., keep, backend, us, timing, info} from pytest-benchmark's finished benchmarks."""
    rows = []
    for bench in benchmarks:
        info = getattr(bench, "extra_info", None) or {}
        stats = getattr(bench, "stats", None)
        if "backend" not in info or not all(k in info for k in _SHAPE) or not stats:
            continue
        try:
            us = float(stats.median) * 1e6
        except Exception:  # no data points (errored or disabled run)
            continue
        rows.append(dict(info=info, us=us, keep=info.get("keep_ratio"), backend=info["backend"],
                         timing=info.get("timing", "?"), shape=tuple(info[k] for k in _SHAPE)))
    return rows


def attention_summary(benchmarks) -> list[str]:
    """Set extra_info["speedup_vs_dense"] on every attention op; return the summary table's lines."""
    rows = _op_rows(benchmarks)
    if not rows:
        return []
    dense = {r["shape"]: r for r in rows if r["backend"] == "dense"}
    for r in rows:
        d = dense.get(r["shape"])
        r["info"]["speedup_vs_dense"] = round(d["us"] / r["us"], 3) if d and r["us"] > 0 else None
    table: dict = {}
    for r in rows:
        if r["backend"] != "dense":
            table.setdefault((*r["shape"], r["keep"]), {})[r["backend"]] = r

    def us(r):
        if r is None:
            return "-"
        return f"{r['us']:.1f}" + ("*" if r["timing"] != "graph" and any(x["timing"] == "graph" for x in rows) else "")

    def speed(r):
        sp = None if r is None else r["info"].get("speedup_vs_dense")
        return "-" if sp is None else f"{sp:.2f}x"

    head = f"{'layout':<6} {'keys':>6} {'q':>4} {'keep':>5} {'dense us':>10} {'flex us':>10} {'gather us':>10}"
    head += f" {'flex/dense':>10} {'gath/dense':>10}"
    modes = sorted({r["timing"] for r in rows})
    lines = [f"attention ops: median per call (timing: {', '.join(modes)}; speedup = dense us / op us)", head]
    for key in sorted(table, key=lambda x: (x[0], x[1], x[2], x[3])):
        ops, d = table[key], dense.get(key[:3])
        layout, keys, t, keep = key
        lines.append(
            f"{layout:<6} {keys:>6} {t:>4} {keep:>5.0%} {us(d):>10} {us(ops.get('flex')):>10} "
            f"{us(ops.get('gather')):>10} {speed(ops.get('flex')):>10} {speed(ops.get('gather')):>10}"
        )
    if any(r["timing"] != "graph" for r in rows) and any(r["timing"] == "graph" for r in rows):
        lines.append("* eager wall clock (CUDA-graph capture failed: see extra_info['graph_error'])")
    for r in rows:
        if r["info"].get("graph_error"):
            lines.append(f"graph_error {r['shape']} keep={r['keep']} {r['backend']}: {r['info']['graph_error']}")
    return lines


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    # Before pytest-benchmark's own sessionfinish (which writes --benchmark-json), so the JSON has the speedups.
    bs = getattr(session.config, "_benchmarksession", None)
    try:
        session.config._attention_summary = attention_summary(getattr(bs, "benchmarks", None) or [])
    except Exception as e:  # never lose the benchmark JSON over the summary
        session.config._attention_summary = [f"attention summary failed: {type(e).__name__}: {e}"]
    yield


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's table
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = getattr(config, "_attention_summary", None)
    if lines:
        terminalreporter.write_sep("-", "attention op summary")
        for line in lines:
            terminalreporter.write_line(line)
