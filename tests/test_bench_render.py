"""bench/benchmark.py re-renders only its own part of RESULTS.md: sections written by other
bench commands or by hand survive, and rendering twice changes nothing."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("bench_benchmark", REPO / "bench" / "benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_render_keeps_other_sections_and_is_idempotent(tmp_path):
    bm = _benchmark()
    shutil.copy(REPO / "bench" / "results_cpu.json", tmp_path / "results_cpu.json")
    out = tmp_path / "RESULTS.md"
    # a file from before the end marker existed: a generated section, then a hand-written one
    out.write_text("# Benchmark results\n\n## jax 0.0.1, backend cpu, stale\n\nold rows\n\n"
                   "## Input pipeline: `python bench/loader.py`\n\n| a | b |\n|---|---|\n")
    bm.render(tmp_path, out)
    first = out.read_text()
    assert "stale" not in first and "old rows" not in first
    assert first.count("## Input pipeline") == 1 and "| a | b |" in first
    assert first.index(bm._GENERATED_END) < first.index("## Input pipeline")
    bm.render(tmp_path, out)
    assert out.read_text() == first
