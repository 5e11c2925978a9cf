"""Smoke runs of the benchmark scripts in their --tiny mode: they run and print their figures and ratios (the
figures are measurements, not asserted as timings; the ROUGE equality they check is)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def run_bench(*args: str) -> list[dict]:
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_bench_score_tiny():
    lines = run_bench("bench/score.py", "--tiny")
    ratio = [line for line in lines if "ratio" in line][0]
    assert ratio["max_abs_difference"] <= 1e-9 and ratio["value"] > 0
    assert {line.get("figure") for line in lines} >= {"rouge_score_loop", "tunequeue_scorer"}


def test_bench_generate_tiny():
    lines = run_bench("bench/generate.py", "--tiny", "--examples", "16", "--adapters", "2")
    figures = {line.get("figure") for line in lines}
    assert figures >= {"one_at_a_time", "batched", "adapters_swapped", "adapters_mixed_batch"}
    assert all(line["value"] > 0 for line in lines if "ratio" in line)
