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
    lines = run_bench("bench/generate.py", "--tiny", "--examples", "16", "--adapters", "2", "--batch-size", "8",
                      "--large-batch-size", "16", "--repeats", "1")
    figures = {line.get("figure") for line in lines}
    assert figures >= {"one_at_a_time", "batched", "adapters_swapped", "adapters_mixed_batch"}
    assert all(line["value"] > 0 for line in lines if "ratio" in line)
    assert len([line for line in lines if line.get("figure") == "batched"]) == 2


def test_bench_train_tiny():
    lines = run_bench("bench/train.py", "--tiny", "--samples", "128")
    seed, ours = [line for line in lines if line.get("figure") in ("seed_recipe", "tunequeue")]
    assert seed["real_token_fraction"] < 0.5 < ours["real_token_fraction"]  # padding to 512 wastes most compute
    assert seed["gflop_per_sample"] > 3 * ours["gflop_per_sample"] > 0
    assert [line for line in lines if "ratio" in line][0]["value"] > 0


def test_bench_queue_tiny(tmp_path):
    lines = run_bench("bench/queue_latency.py", "--jobs", "10")
    queue = [line for line in lines if line.get("figure") == "queue"][0]
    assert queue["succeeded"] == 10 and queue["base_loads"] == 1
