"""Smarter sweeps, three ways in one run on the same machine: the same 27-point space (learning rate × LoRA rank ×
LoRA alpha, 3 values each, LoRA on q,v, tiny-t5 on synthetic-dialogsum) searched

- as a full grid: every point trained to max_steps;
- by ASHA (strategy kind asha, η = 3, `--rungs 4`: min_steps = max_steps / 27, rungs at m, 3m, 9m and 27m =
  max_steps, the classic 27 → 9 → 3 → 1 halving of 27 points; decided on the validation loss, which every point
  computes at its rungs anyway; a pruned point stops where it is; `--promotion`: lazy, the default, or eager);
- by TPE (strategy kind tpe, the same three lists as categorical choices, `--tpe-trials` trials, one in flight at a
  time so that every proposal sees every earlier result; each trial trained to max_steps). 9 by default: a third of
  the grid, so that TPE spends what a good halving run spends (nothing of a TPE trial is stopped early).

An asynchronous rung decision compares a point only with those that reached the rung before it, so ASHA's saving
depends on the order its points arrive in: ASHA queues them in a seeded shuffled order by default (strategy.order;
`--asha-order as-written` takes them as the file's lists expand, learning rate first, and `--order reversed` writes
every list backwards, which the grid and TPE see too).

Each is a real `manage.py sweep` of the same sweep file (only its strategy block differs) drained by one `manage.py
worker --burst`, then `manage.py report --sweep NAME --format json`, in a fresh TUNEQUEUE_HOME, SQLite database and
queue name of its own (the built-in models copied in, as after a first night). Per search: the training steps it
spent (each fine-tune's last step, from its job result: a pruned point's step at its rung, a promoted one resumes
from its rung checkpoint, so nothing is trained twice; for ASHA checked against the rungs table), the wall time
(sweep + worker + report), and the best evaluated point's test ROUGE-1 (ASHA's evaluation covers the points that
reached max_steps). Then ASHA's and TPE's steps as a fraction of the grid's (target ≤ 0.40) and their best ROUGE-1
minus the grid's best (target ≥ −0.02).

A search takes minutes, so the three run once each, one after the other (not interleaved pairs, bench/_common.py):
the load average at the start and end of each is in its line; read the wall times with it. The step counts and the
ROUGE do not depend on the load (one worker takes the jobs in the same order whatever the timing).

    python bench/asha.py                   # the default: ~10 minutes on 2 shared CPU cores
    python bench/asha.py --tiny            # a smoke run: a 2 × 2 × 2 space, a few steps
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

from bench._common import REPO, emit, emit_machine, leave, sig  # noqa: E402

SPACE = {"learning_rate": [1e-3, 3e-3, 1e-2], "lora_r": [4, 8, 16], "lora_alpha": [8, 16, 32]}
# the smoke run's points come best-first (the higher learning rate first), so that its later points arrive worse at
# the first rung and ASHA prunes some of them whatever the machine
TINY_SPACE = {"learning_rate": [1e-2, 1e-3], "lora_r": [16, 4], "lora_alpha": [8, 32]}
ETA = 3
STEPS_TARGET = 0.40  # ASHA's steps as a fraction of the grid's
QUALITY_MARGIN = 0.02  # its best ROUGE-1 may be this much below the grid's best
SEARCHES = ("grid", "asha", "tpe")


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def sweep_file(search: str, args, space: dict) -> dict:
    base = {"model": "tiny-t5", "dataset": "synthetic-dialogsum", "target_modules": ["q", "v"],
            "train_limit": args.train_limit, "eval_limit": args.eval_limit,
            # the eval loss once, at the end (ASHA's rungs compute theirs at every rung on top of it)
            "eval_steps": args.max_steps}
    sweep = {"name": search, "base": base, "grid": space,
             "eval": {"split": "test", "limit": args.test_limit, "max_new_tokens": args.max_new_tokens}}
    if search == "grid":
        base["max_steps"] = args.max_steps
    elif search == "asha":
        sweep["strategy"] = {"kind": "asha", "metric": args.metric,
                             "min_steps": args.max_steps // ETA ** (args.rungs - 1),
                             "max_steps": args.max_steps, "reduction_factor": ETA, "order": args.asha_order,
                             "promotion": args.promotion, "seed": 0}
    else:
        base["max_steps"] = args.max_steps
        sweep["strategy"] = {"kind": "tpe", "metric": "eval_loss", "n": args.tpe_trials, "parallel": 1,
                             "seed": 0}
    return sweep


def run_search(search: str, root: Path, model_home: Path, args, space: dict) -> dict:
    home = root / search
    home.mkdir()
    shutil.copytree(model_home / "builtin", home / "builtin")
    env = {**os.environ, "TUNEQUEUE_HOME": str(home), "DATABASE_URL": f"sqlite:///{home / 'tunequeue.db'}",
           "TUNEQUEUE_QUEUE": f"tq-asha-bench-{uuid.uuid4().hex[:8]}"}
    from models.migrate import upgrade
    from models.settings import Settings

    upgrade(Settings.from_env(env).database_url)  # installed once, not part of a search
    path = root / f"{search}.yaml"
    path.write_text(json.dumps(sweep_file(search, args, space)))  # JSON is YAML
    manage = [sys.executable, str(REPO / "manage.py")]
    load_start, started = load(), time.time()
    _run(manage + ["sweep", str(path)], env)
    _run(manage + ["worker", "--burst", "--loglevel", "WARNING"], env)
    report = _run(manage + ["report", "--sweep", search, "--format", "json"], env)
    wall = time.time() - started
    if args.show_report:
        print(_run(manage + ["report", "--sweep", search], env).stdout, file=sys.stderr)
    points = trained_points(env, search)
    rouge = evaluated_rouge1(json.loads(report.stdout))
    return {"search": search, "wall_s": wall, "load_start": load_start, "load_end": load(), "points": points,
            "rouge1": rouge}


def _run(command: list[str], env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command[2:4])} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return done


def trained_points(env: dict, search: str) -> list[dict]:
    """Each fine-tune of the sweep in queue order: its adapter, its point, the steps it trained, its runs (one more
    per promotion) and, for ASHA, its rung decisions."""
    from sqlalchemy import select

    from models import make_session_factory
    from models.jobs import Job, JobKind, JobStatus
    from models.search import Rung
    from models.settings import Settings

    sessions = make_session_factory(Settings.from_env(env).database_url)
    with sessions() as session:
        jobs = list(session.scalars(select(Job).order_by(Job.id)))
        bad = [(j.id, j.kind.value, j.status.value) for j in jobs
               if j.status not in (JobStatus.succeeded, JobStatus.pruned)]
        if bad:
            raise SystemExit(f"{search}: jobs that did not end well: {bad}")
        rungs: dict[int, list[Rung]] = {}
        for rung in session.scalars(select(Rung).order_by(Rung.job_id, Rung.step)):
            rungs.setdefault(rung.job_id, []).append(rung)
        points = []
        for job in jobs:
            if job.kind != JobKind.finetune:
                continue
            result = job.result or {}
            steps = result["steps"]
            decided = rungs.get(job.id, [])
            if decided and decided[-1].step != steps:  # the rungs table and the result must tell the same story
                raise SystemExit(f"{search}: job {job.id} trained {steps} steps, its last rung is at "
                                 f"{decided[-1].step}")
            points.append({"adapter": job.output_name, "status": job.status.value, "steps": steps,
                           "attempts": job.attempts,
                           **{k: job.spec[k] for k in SPACE},
                           "eval_loss": result.get("search_value", result.get("eval_loss")),
                           "rungs": [f"{r.step}:{r.decision}" for r in decided]})
    return points


def evaluated_rouge1(report: object) -> dict[str, float]:
    """ROUGE-1 of each evaluated adapter (not the base row) in the report's JSON."""
    rows = report["rows"] if isinstance(report, dict) else report
    out = {}
    for row in rows:
        name = row.get("variant") or row.get("adapter") or row.get("run")
        value = row.get("rouge1")
        if isinstance(value, dict):
            value = value.get("mean", value.get("value"))
        if name and name != "base" and value is not None:
            out[name] = float(value)
    return out


def summary(side: dict) -> dict:
    points, rouge = side["points"], side["rouge1"]
    best = max(rouge, key=rouge.get)
    best_point = next(p for p in points if p["adapter"] == best)
    full = [p for p in points if p["status"] == "succeeded"]
    return {"search": side["search"], "points_trained": len(points), "points_to_max_steps": len(full),
            "points_evaluated": len(rouge), "steps": sum(p["steps"] for p in points),
            "promotions": sum(p["attempts"] - 1 for p in points),
            "wall_s": sig(side["wall_s"]), "best_rouge1": round(rouge[best], 4),
            "best_point": {k: best_point[k] for k in SPACE}, "best_adapter": best,
            "load_avg_1_5_15_start": side["load_start"], "load_avg_1_5_15_end": side["load_end"]}


def table(rows: list[dict], grid: dict) -> str:
    lines = ["| search | points trained | to max_steps | training steps | steps / grid | wall (s) | wall / grid "
             "| best test ROUGE-1 | − grid's best | best point (lr, r, alpha) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        point = row["best_point"]
        lines.append(f"| {row['search']} | {row['points_trained']} | {row['points_to_max_steps']} | {row['steps']:,} "
                     f"| {row['steps'] / grid['steps']:.2f} | {row['wall_s']:g} | {row['wall_s'] / grid['wall_s']:.2f} "
                     f"| {row['best_rouge1']:.4f} | {row['best_rouge1'] - grid['best_rouge1']:+.4f} "
                     f"| {point['learning_rate']:g}, {point['lora_r']}, {point['lora_alpha']:g} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a smoke run: a 2 × 2 × 2 space, 9 steps, few examples")
    parser.add_argument("--max-steps", type=int, default=None, help="steps of a point trained to the end [108; tiny 9]")
    parser.add_argument("--train-limit", type=int, default=None, help="training examples [2000; tiny 64]")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="validation examples of the eval loss [100; tiny 8]")
    parser.add_argument("--test-limit", type=int, default=None, help="test examples generated per point [100; tiny 4]")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--tpe-trials", type=int, default=None, help="TPE's trials [9: a third of the grid; tiny 3]")
    parser.add_argument("--order", choices=("as-written", "reversed"), default="as-written",
                        help="the order of each list in the space, which is the order the points are queued in "
                             "(the grid expands learning rate first); reversed: every list backwards")
    parser.add_argument("--metric", default="eval_loss", choices=("eval_loss", "rouge1"),
                        help="what ASHA decides on at its rungs: the validation loss, or the validation ROUGE-1 of "
                             "greedy summaries (the figure the search is judged by, at a generation per rung)")
    parser.add_argument("--rungs", type=int, default=None,
                        help="ASHA's rungs, the last at max_steps: min_steps = max_steps / η^(rungs - 1) [4: the "
                             "classic 27 → 9 → 3 → 1 halving of 27 points; tiny 3]")
    parser.add_argument("--asha-order", choices=("shuffled", "as-written"), default=None,
                        help="ASHA's strategy.order: its points queued in a seeded shuffled order (the default) or "
                             "as the lists expand [shuffled; tiny as-written, so the smoke run prunes on any machine]")
    parser.add_argument("--promotion", choices=("lazy", "eager"), default="lazy",
                        help="ASHA's strategy.promotion: lazy (a point waits at its rung until it is in the best 1/η "
                             "there, ASHA as published; the default) or eager (Optuna's SuccessiveHalvingPruner "
                             "decides as it arrives)")
    parser.add_argument("--searches", default=",".join(SEARCHES), help="which to run, grid first [grid,asha,tpe]")
    parser.add_argument("--show-report", action="store_true", help="print each sweep's report table on stderr")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder (printed)")
    args = parser.parse_args()
    defaults = dict(rungs=(3, 4), max_steps=(9, 108), train_limit=(64, 2000), eval_limit=(8, 100),
                    test_limit=(4, 100),
                    tpe_trials=(3, 9))
    defaults["asha_order"] = ("as-written", "shuffled")
    for key, (tiny, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    if args.max_steps % ETA ** (args.rungs - 1):
        parser.error(f"--max-steps must be a multiple of {ETA ** (args.rungs - 1)} (min_steps = max_steps / "
                     f"η^(rungs - 1))")
    searches = [s.strip() for s in args.searches.split(",") if s.strip()]
    if searches[:1] != ["grid"] or not set(searches) <= set(SEARCHES):
        parser.error("--searches: grid first, then any of asha, tpe")
    space = TINY_SPACE if args.tiny else SPACE
    if args.order == "reversed":
        space = {key: values[::-1] for key, values in space.items()}
    m = args.max_steps // ETA ** (args.rungs - 1)
    root = Path(tempfile.mkdtemp(prefix="tq-asha-"))
    from bench.night import cpu_model
    from worker.ml.builtin import ensure_builtin

    try:
        ensure_builtin("tiny-t5", root / "model-home")
        emit(figure="asha", model="tiny-t5", dataset="synthetic-dialogsum", space=space, order=args.order,
             asha_order=args.asha_order,
             points=math.prod(len(v) for v in space.values()), max_steps=args.max_steps,
             asha={"reduction_factor": ETA, "min_steps": m, "rungs": [m * ETA ** k for k in range(args.rungs)],
                   "metric": args.metric, "promotion": args.promotion},
             tpe={"trials": args.tpe_trials, "parallel": 1, "metric": "eval_loss"},
             train_limit=args.train_limit, eval_limit=args.eval_limit, test_limit=args.test_limit,
             cpu=cpu_model(), cpus=os.cpu_count(), load_avg_1_5_15_at_start=load(),
             repeats="each search runs once, one after the other (minutes each); not interleaved pairs")
        rows = []
        for search in searches:
            side = run_search(search, root, root / "model-home", args, space)
            for point in side["points"]:
                emit(search=search, point=point["adapter"], **{k: v for k, v in point.items() if k != "adapter"},
                     test_rouge1=side["rouge1"].get(point["adapter"]))
            rows.append(summary(side))
            emit(**rows[-1])
        grid = rows[0]
        for row in rows[1:]:
            fraction = row["steps"] / grid["steps"]
            gap = row["best_rouge1"] - grid["best_rouge1"]
            steps_met, quality_met = fraction <= STEPS_TARGET, gap >= -QUALITY_MARGIN
            emit(ratio=f"{row['search']} / grid", steps_fraction=round(fraction, 3), steps_target=STEPS_TARGET,
                 steps_met=steps_met, wall_fraction=round(row["wall_s"] / grid["wall_s"], 3),
                 best_rouge1_gap=round(gap, 4), rouge1_margin=QUALITY_MARGIN, quality_met=quality_met,
                 met=steps_met and quality_met, runs=1)
        emit_machine()
        print(table(rows, grid))
    finally:
        leave(root, args.keep)


if __name__ == "__main__":
    main()
