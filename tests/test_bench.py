"""Smoke runs of the benchmark scripts on small inputs: they run and print their figures and ratios, every ratio
from at least 5 interleaved pairs with its min ≤ median ≤ max, every figure's median inside its range (the figures
are measurements, not asserted as timings; the ROUGE equality they check is)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


def run_bench(*args: str) -> list[dict]:
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    ratios = [line for line in lines if "ratio" in line]
    assert ratios
    for line in ratios:
        assert line["pairs"] >= 5 and line["min"] <= line["value"] <= line["max"], line
        assert line["value"] > 0
    for line in lines:
        for key, (low, high) in ((k, v) for k, v in line.items() if k.endswith("_range")):
            assert low <= line[key.removesuffix("_range")] <= high, line
    return lines


def test_bench_score_small():
    lines = run_bench("bench/score.py", "--rouge-pairs", "500")
    ratio = [line for line in lines if "ratio" in line][0]
    assert ratio["max_abs_difference"] <= 1e-9
    assert {line.get("figure") for line in lines} >= {"rouge_score_loop", "tunequeue_scorer"}


def test_bench_generate_small():
    lines = run_bench("bench/generate.py", "--tiny", "--examples", "16", "--slow-examples", "4", "--adapters", "2",
                      "--large-batch-size", "16", "--budgets", "256,100000")
    figures = {line.get("figure") for line in lines}
    assert figures >= {"one_at_a_time", "batched", "adapters_swapped", "adapters_mixed_batch",
                       "one_adapter_merged_copy"}
    default, fixed = [line for line in lines if line.get("figure") == "batched"]
    assert default["batch_size"] is None and default["batch_tokens"] > 0 and fixed["batch_size"] == 16
    small, large = [line for line in lines if line.get("figure") == "budget"]
    assert small["batches"] > 1 and small["rows_per_batch"][1] < 16 and large["batches"] == 1  # cut by the budget
    assert "4 of the 16" in [line for line in lines if line.get("figure") == "one_at_a_time"][0]["subset"]
    assert len([line for line in lines if "ratio" in line]) == 5


def test_bench_night_small():
    """Two points of a few steps each way; each side runs once (a night is not repeated), so there are no pairs."""
    result = subprocess.run([sys.executable, "bench/night.py", "--points", "2", "--max-steps", "3",
                             "--test-limit", "4"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert "each side runs once" in lines[0]["repeats"] and lines[0]["points"] == 2
    assert [line["point"] for line in lines if line.get("side") == "peers" and "point" in line] == [1, 2]
    sides = {line["side"]: line for line in lines if "side" in line and "wall_s" in line and "point" not in line}
    for side in sides.values():
        assert side["wall_s"] > 0 and side["runs"] == 1
        assert 0 <= side["rouge1_mean"] <= side["rouge1_max"] <= 1  # both sides produced ROUGE
        assert set(side["parts_s"]) >= {"process_start_imports", "model_load", "train", "generate", "score"}
        assert abs(side["unaccounted_s"]) < 0.05 * side["wall_s"]  # the split covers the wall time
    assert set(sides) == {"peers", "tunequeue", "tunequeue, one by one"}  # --cotrain 1,8 by default
    one_by_one = sides["tunequeue, one by one"]["jobs"]
    assert [job["kind"] for job in one_by_one] == ["finetune", "finetune", "generate", "score"]
    assert all("train_s" in job for job in one_by_one[:2])
    # co-trained (the worker's default): one pass trains both points; the second point's time is the first job's
    together = sides["tunequeue"]["jobs"]
    assert [job["kind"] for job in together] == ["finetune", "generate", "score", "finetune"]
    assert "train_s" in together[0] and together[-1]["co_trained_in_job"] > 0
    ratios = [line for line in lines if "ratio" in line]
    assert [r["ratio"] for r in ratios] == ["night wall: peers / tunequeue, one by one",
                                           "night wall: peers / tunequeue"]
    for ratio in ratios:
        assert ratio["value"] > 0 and ratio["runs"] == 1 and isinstance(ratio["quality_holds"], bool)
    assert lines[-1]["figure"] == "machine"


def test_bench_train_small():
    lines = run_bench("bench/train.py", "--tiny", "--samples", "128")
    seed, ours = [line for line in lines if line.get("figure") in ("seed_recipe", "tunequeue")]
    assert seed["real_token_fraction"] < 0.5 < ours["real_token_fraction"]  # padding to 512 wastes most compute
    assert seed["gflop_per_sample"] > 3 * ours["gflop_per_sample"] > 0
    assert seed["samples"] < ours["samples"] and "subset" in seed


def test_bench_queue_small():
    lines = run_bench("bench/queue_latency.py", "--jobs", "10")
    queue = [line for line in lines if line.get("figure") == "queue"][0]
    assert queue["rounds"] == 5 and queue["succeeded"] == 50 and queue["base_loads"] == 1


def test_bench_qlora_small():
    """Training and generation only (each configuration is a process of its own that imports torch, transformers and
    peft: the resident-bytes part alone adds ~12 s)."""
    lines = run_bench("bench/qlora.py", "--tiny", "--models", "tiny-llama", "--parts", "train,generate",
                      "--train-steps", "1", "--train-batch", "4", "--examples", "8", "--new-tokens", "4")
    trained = {line["config"]: line for line in lines if line.get("figure") == "train"}
    assert trained["qlora_gc_adamw8bit"]["optimizer"] == "AdamW8bit" and trained["qlora_gc_adamw8bit"]["checkpointing"]
    assert trained["lora"]["optimizer"] == "AdamW" and not trained["lora"]["checkpointing"]
    mixed = [line for line in lines if "mixed on 4bit" in line.get("ratio", "")][0]
    assert mixed["same_predictions"] == mixed["of"] == 8  # the hooks give PEFT's own predictions
    assert len([line for line in lines if "ratio" in line]) == 7


@pytest.mark.slow
def test_bench_asha_small():
    """Grid, ASHA and TPE on a 2 × 2 × 2 space of 9 steps, each once (no pairs): the table's structure, every
    point's steps against its rungs, and ASHA training fewer steps than the grid (its figures are not timings)."""
    result = subprocess.run([sys.executable, "bench/asha.py", "--tiny"], cwd=REPO, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    header = lines[0]
    assert header["points"] == 8 and header["max_steps"] == 9 and header["asha"]["rungs"] == [1, 3, 9]
    assert "each search runs once" in header["repeats"]
    searches = {line["search"]: line for line in lines if "points_trained" in line}
    assert list(searches) == ["grid", "asha", "tpe"]
    grid, asha, tpe = searches["grid"], searches["asha"], searches["tpe"]
    assert grid["points_trained"] == grid["points_to_max_steps"] == grid["points_evaluated"] == 8
    assert grid["steps"] == 8 * 9 and grid["promotions"] == 0
    assert asha["points_trained"] == 8 and asha["points_evaluated"] == asha["points_to_max_steps"] < 8
    assert asha["steps"] < grid["steps"] and asha["promotions"] > 0
    assert tpe["points_trained"] == tpe["points_evaluated"] == 3 and tpe["steps"] == 3 * 9
    for line in searches.values():
        assert line["wall_s"] > 0 and 0 <= line["best_rouge1"] <= 1 and set(line["best_point"]) == {
            "learning_rate", "lora_r", "lora_alpha"}
    points = [line for line in lines if line.get("search") == "asha" and "point" in line]
    assert sum(p["steps"] for p in points) == asha["steps"]
    for point in points:  # each point's last rung is where it stopped: pruned at 1 or 3, or complete at 9
        last_step, last = point["rungs"][-1].split(":")
        assert int(last_step) == point["steps"]
        assert (point["status"], last) in (("pruned", "prune"), ("succeeded", "complete"))
        assert (point["test_rouge1"] is None) == (point["status"] == "pruned")  # evaluated: those reaching 9
    ratios = {line["ratio"]: line for line in lines if "ratio" in line}
    assert set(ratios) == {"asha / grid", "tpe / grid"}
    assert ratios["asha / grid"]["steps_fraction"] == round(asha["steps"] / grid["steps"], 3)
    assert ratios["asha / grid"]["best_rouge1_gap"] == round(asha["best_rouge1"] - grid["best_rouge1"], 4)
    assert all(isinstance(r["met"], bool) and r["runs"] == 1 for r in ratios.values())
    assert lines[-1]["figure"] == "machine"
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in table[1:]] == ["grid", "asha", "tpe"]


@pytest.mark.slow
def test_bench_affinity_small():
    """Three workers, 12 generate jobs of two examples for two bases, a model cache that holds one base: both sides
    run every job, the per-worker loads add up and each job's load marks agree with them (the counts are measured,
    not asserted as a saving: each side runs once, and which worker takes what is up to Redis)."""
    result = subprocess.run([sys.executable, "bench/affinity.py", "--tiny"], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines[0]["figure"] == "setup" and lines[0]["jobs"] == 12 and lines[0]["workers"] == 3
    sides = {line["side"]: line for line in lines if "side" in line}
    assert list(sides) == ["affinity", "base-blind"]
    for side in sides.values():
        assert side["budget"] == "one base" and sum(side["jobs_per_worker"]) == 12
        assert side["loads"] == sum(side["loads_per_worker"]) >= 2  # each base loaded at least once
        taken = " ".join(side["taken"].values()).split()
        assert len(taken) == 12 and sorted(t[0] for t in taken) == ["A"] * 6 + ["B"] * 6
        assert sum(t.endswith("*") for t in taken) == side["loads"]
        for worker, jobs in side["taken"].items():  # a one-base cache reloads whenever the base changes
            bases = [t[0] for t in jobs.split()]
            assert all(("*" in t) == (i == 0 or bases[i] != bases[i - 1]) for i, t in enumerate(jobs.split())), jobs
    assert lines[-1]["figure"] == "machine"
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [row.split("|")[2].strip() for row in table[1:]] == ["affinity", "base-blind"]
