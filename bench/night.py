"""The whole night, end to end, two ways in one run on the same machine: the same sweep (learning rate × LoRA rank,
LoRA on q,v, one epoch, tiny-t5 on synthetic-dialogsum, 100 test examples) run

- the peers' way (AutoTrain, LLaMA-Factory, Axolotl, H2O LLM Studio): a loop starting one fresh `python` process
  per point that runs bench/peer_recipe.py (load, `datasets.map`, `Seq2SeqTrainer.train()`, reload, `predict` with
  generation, `rouge_score`), each point printing where its time went;
- tunequeue's way: one `manage.py worker` started with the night, beside `manage.py sweep` of the same points (two
  terminals), `manage.py jobs watch --sweep` until every job has ended, then `manage.py report`; the worker's exit
  is not part of the night (a worker stays up between nights). The split of time is read from the job rows
  (queued / started / finished, and the timings in each job's result);
  once per `--cotrain` value (TUNEQUEUE_COTRAIN: 8, the default, trains up to 8 points in one pass; 1 one by one).

Each side runs in a fresh home of its own (tunequeue: a fresh TUNEQUEUE_HOME, SQLite database and queue name on the
local Redis; the peers: a fresh Hugging Face cache and output folders); both read the same model folder and the
same data (the built-in dataset for tunequeue, the same examples as JSON Lines files for the peers). Every value
Hugging Face's `Trainer` leaves to its defaults stays at them, except what the sweep fixes for both sides: the
learning rate and rank, LoRA alpha 32 on q,v, one epoch, inputs cut at 256 tokens and targets at 64, at most 64
generated tokens, greedy. The batch size is each side's own default (the Trainer's 8; tunequeue's 16, in
length-bucketed batches), as a user of either would run it; the quality rule below is what keeps that fair.
`--batch-size N` fixes it for both sides instead (the same number of optimizer steps on each).

A night is too long to repeat five times, so the sides are not interleaved (bench/_common.py): each side runs once,
one after the other, and the output says so; read its `machine` line (load average) before trusting the ratio.
The ratio counts only if tunequeue's mean ROUGE-1 over the points is at most 0.02 below the peers'.

    python bench/night.py                      # tiny-t5 on CPU, 8 points
    python bench/night.py --points 2 --max-steps 5 --test-limit 8     # a smoke run
    python bench/night.py --full               # the FLAN-T5-base architecture (random weights), for a GPU
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
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

from bench._common import FLAN_T5_BASE, REPO, emit, emit_machine, leave, sig  # noqa: E402

GRID = {"learning_rate": [1e-3, 2e-3, 3e-3, 5e-3], "lora_r": [8, 16]}
FIXED = {"lora_alpha": 32, "num_train_epochs": 1, "max_source_length": 256,
         "max_target_length": 64}
MAX_NEW_TOKENS = 64
QUALITY_MARGIN = 0.02  # tunequeue's mean ROUGE-1 may be this much below the peers' and the ratio still counts
# where the time went, the same parts on both sides
PARTS = ("process_start_imports", "model_load", "data_tokenize", "train", "generate", "score", "queue_idle", "other")


def sweep_points(count: int) -> list[dict]:
    keys = list(GRID)
    return [dict(zip(keys, values)) for values in itertools.product(*GRID.values())][:count]


def prepare(root: Path, full: bool) -> tuple[Path, Path, str]:
    """The model folder both sides load, a built-in home holding it, and the data as JSON Lines: (model folder,
    data folder, tunequeue's name for the model)."""
    from worker.data import synthetic
    from worker.ml.builtin import ensure_builtin

    tiny = ensure_builtin("tiny-t5", root / "model-home")
    model, name = tiny, "tiny-t5"
    if full:
        from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

        model = root / "flan-t5-base-random"
        T5ForConditionalGeneration(T5Config(**FLAN_T5_BASE, architectures=["T5ForConditionalGeneration"])
                                   ).save_pretrained(model)
        AutoTokenizer.from_pretrained(tiny).save_pretrained(model)
        name = str(model)
    data = root / "data"
    data.mkdir()
    for split in ("train", "validation", "test"):
        with open(data / f"{split}.jsonl", "w") as out:
            for example in synthetic.generate_split(split):
                out.write(json.dumps(example) + "\n")
    return model, data, name


# ------------------------------------------------------------------------------------------------ the peers' way
def run_peers(root: Path, model: Path, data: Path, points: list[dict], args) -> dict:
    home = root / "peers"
    env = {**os.environ, "HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
    parts = dict.fromkeys(PARTS, 0.0)
    rouge, started = [], time.time()
    previous_end = started
    for index, point in enumerate(points, start=1):
        command = [sys.executable, str(REPO / "bench" / "peer_recipe.py"), "--model", str(model), "--data", str(data),
                   "--out", str(home / f"point-{index}"), "--learning-rate", str(point["learning_rate"]),
                   "--lora-r", str(point["lora_r"]), "--lora-alpha", str(FIXED["lora_alpha"]),
                   "--epochs", str(FIXED["num_train_epochs"]),
                   *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
                   "--max-source-length", str(FIXED["max_source_length"]),
                   "--max-target-length", str(FIXED["max_target_length"]), "--max-new-tokens", str(MAX_NEW_TOKENS),
                   "--test-limit", str(args.test_limit), "--max-steps", str(args.max_steps or -1)]
        launched = time.time()
        parts["queue_idle"] += launched - previous_end  # the loop between two processes
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
        previous_end = time.time()
        if done.returncode:
            raise SystemExit(f"peer recipe failed on point {index}:\n{done.stderr[-3000:]}")
        result = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
        m = result["marks"]
        point_parts = {"process_start_imports": m["imported"] - launched + previous_end - m["scored"],
                       "model_load": m["model_loaded"] - m["imported"] + m["reloaded"] - m["trained"],
                       "data_tokenize": m["tokenized"] - m["model_loaded"],
                       "train": m["trained"] - m["tokenized"], "generate": m["generated"] - m["reloaded"],
                       "score": m["scored"] - m["generated"]}
        for key, seconds in point_parts.items():
            parts[key] += seconds
        rouge.append(result["rouge"]["rouge1"])
        emit(side="peers", point=index, **point, rouge1=sig(result["rouge"]["rouge1"]), steps=result["steps"],
             wall_s=sig(previous_end - launched), **{f"{k}_s": sig(v) for k, v in point_parts.items()})
    return {"wall_s": time.time() - started, "parts": parts, "rouge1": rouge}


# ------------------------------------------------------------------------------------------------ tunequeue's way
def run_tunequeue(root: Path, model_home: Path, model_name: str, points: list[dict], args, cotrain: int = 1) -> dict:
    home = root / f"tunequeue-{cotrain}"
    home.mkdir()
    shutil.copytree(model_home / "builtin", home / "builtin")  # the built-ins exist, as after the first night
    queue = f"tq-night-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "TUNEQUEUE_HOME": str(home), "DATABASE_URL": f"sqlite:///{home / 'tunequeue.db'}",
           "TUNEQUEUE_QUEUE": queue, "TUNEQUEUE_COTRAIN": str(cotrain)}
    from models.migrate import upgrade
    from models.settings import Settings

    upgrade(Settings.from_env(env).database_url)  # installed once, not part of a night
    base = {"model": model_name, "dataset": "synthetic-dialogsum", "target_modules": ["q", "v"], **FIXED}
    if args.batch_size:
        base["per_device_train_batch_size"] = args.batch_size
    if args.max_steps:
        base["max_steps"] = args.max_steps
    sweep = {"name": "night", "base": base, "grid": {k: sorted({p[k] for p in points}) for k in GRID},
             "eval": {"split": "test", "limit": args.test_limit, "max_new_tokens": MAX_NEW_TOKENS}}
    if len(points) != math.prod(len(values) for values in sweep["grid"].values()):
        raise SystemExit(f"--points {len(points)} is not a whole grid; use 2, 4 or 8")
    (home / "night.yaml").write_text(json.dumps(sweep))  # JSON is YAML
    manage = [sys.executable, str(REPO / "manage.py")]
    with open(home / "worker.log", "w") as worker_log:
        started = time.time()  # the worker starts with the night, beside the sweep command (two terminals)
        worker = subprocess.Popen(manage + ["worker", "--loglevel", "WARNING"], env=env, cwd=REPO,
                                  stdout=worker_log, stderr=subprocess.STDOUT)
        try:
            enqueue = _run(manage + ["sweep", str(home / "night.yaml")], env)
            queued = time.time()
            _run(manage + ["jobs", "watch", "--sweep", "night"], env)  # returns once every job has ended
            watched = time.time()
            report = _run(manage + ["report", "--sweep", "night", "--metric", "rouge"], env)
            ended = time.time()
        finally:  # a worker stays up between nights: its exit is not part of one
            worker.send_signal(signal.SIGTERM)
            if worker.wait(timeout=120):
                print((home / "worker.log").read_text()[-3000:], file=sys.stderr)
    if args.show_report:
        print(report.stdout, file=sys.stderr)
    split = job_split(env, started, watched)
    parts = split.pop("parts")
    parts["other"] += ended - watched  # the report command (the sweep command ran beside the worker's start)
    return {"wall_s": ended - started, "parts": parts, **split,
            "commands_s": {"sweep": sig(queued - started), "report": sig(ended - watched)},
            "enqueue_output": enqueue.stdout.strip()}


def _run(command: list[str], env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command[1:3])} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return done


def _epoch(moment: datetime) -> float:
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()  # rows hold UTC


def job_split(env: dict, worker_launched: float, all_ended: float) -> dict:
    """Where the worker's time went, from the job rows: start-up until the first job, each job's parts (its result's
    timings; a score job's duration from its row), the rest of each job (claim, imports on the first job, writing
    the outcome), the gaps between jobs and until `jobs watch` saw the last end; and the points' ROUGE-1."""
    from sqlalchemy import select

    from models import make_session_factory
    from models.jobs import Job, JobKind, JobStatus
    from models.results import Metric
    from models.settings import Settings

    sessions = make_session_factory(Settings.from_env(env).database_url)
    with sessions() as session:
        jobs = list(session.scalars(select(Job).order_by(Job.started_at)))
        failed = [j.id for j in jobs if j.status != JobStatus.succeeded]
        if failed:
            raise SystemExit(f"tunequeue jobs {failed} did not succeed")
        rouge = dict(session.execute(select(Metric.variant, Metric.value).where(Metric.name == "rouge1")).all())
        # a point trained in another job's co-trained pass: its time is that job's (the pass's timings are shared)
        passengers = [{"kind": j.kind.value, "co_trained_in_job": j.result["co_trained_in_job"]}
                      for j in jobs if (j.result or {}).get("co_trained_in_job")]
        rows = [(j.kind, _epoch(j.queued_at), _epoch(j.started_at), _epoch(j.finished_at), j.result or {})
                for j in jobs if not (j.result or {}).get("co_trained_in_job")]
    parts = dict.fromkeys(PARTS, 0.0)
    names = {"read_data_s": "data_tokenize", "tokenize_s": "data_tokenize", "model_load_s": "model_load",
             "initial_eval_s": "train", "train_s": "train", "generate_s": "generate", "save_s": "other",
             "record_s": "other", "write_s": "other"}
    parts["process_start_imports"] = rows[0][2] - worker_launched  # worker start-up: launch to the first claim
    jobs_out, rest, previous_end = [], [], None
    for kind, queued, job_started, finished, result in rows:
        busy = finished - job_started
        timings = dict(result.get("timings") or {})
        if kind == JobKind.score:
            timings = {"score_s": busy}
        for key, seconds in timings.items():
            parts[names.get(key, key.removesuffix("_s"))] += seconds
        rest.append(busy - sum(timings.values()))
        if previous_end is not None:
            parts["queue_idle"] += max(0.0, job_started - previous_end)
        jobs_out.append({"kind": kind.value, "wait_s": sig(max(0.0, job_started - queued)), "busy_s": sig(busy),
                         "rest_s": sig(rest[-1]), **{k: sig(v) for k, v in timings.items()}})
        previous_end = finished
    typical = statistics.median(rest[1:]) if len(rest) > 1 else 0.0
    # the first job's rest above the others' is the worker importing torch, transformers and peft
    parts["process_start_imports"] += max(0.0, rest[0] - typical)
    parts["other"] += sum(rest) - max(0.0, rest[0] - typical)
    parts["queue_idle"] += all_ended - previous_end  # until `jobs watch` saw the last job end
    points = sorted((v, value) for v, value in rouge.items() if v != "base")
    return {"parts": parts, "rouge1": [value for _, value in points], "base_rouge1": rouge.get("base"),
            "jobs": jobs_out + passengers}


# ------------------------------------------------------------------------------------------------ output
def side_name(cotrain: int) -> str:
    """tunequeue as installed (the worker's default TUNEQUEUE_COTRAIN) is "tunequeue"; other settings say theirs."""
    from models.settings import Settings

    if cotrain == Settings.cotrain:  # the dataclass field's default
        return "tunequeue"
    return "tunequeue, one by one" if cotrain == 1 else f"tunequeue, co-training {cotrain}"


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=8, help="the first N points of the 4 × 2 grid (2, 4 or 8)")
    parser.add_argument("--max-steps", type=int, default=None, help="train this many steps instead of one epoch")
    parser.add_argument("--test-limit", type=int, default=100, help="test examples generated and scored per point")
    parser.add_argument("--full", action="store_true", help="the FLAN-T5-base architecture, random weights")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="train both sides at this batch size [each side's default: the Trainer's 8, tunequeue's 16]")
    parser.add_argument("--cotrain", default="1,8",
                        help="tunequeue's TUNEQUEUE_COTRAIN values, one night each after the peers' [1,8: points "
                             "trained one by one, then up to 8 in one pass, the worker's default]")
    parser.add_argument("--show-report", action="store_true", help="print tunequeue's report on stderr")
    parser.add_argument("--keep", action="store_true", help="keep the night's folder (printed)")
    args = parser.parse_args()
    points = sweep_points(args.points)
    try:
        cotrains = [int(k) for k in args.cotrain.split(",")]
    except ValueError:
        parser.error("--cotrain: whole numbers separated by commas, e.g. 1,8")
    if not cotrains or any(not 1 <= k <= 64 for k in cotrains):
        parser.error("--cotrain: each value from 1 to 64")
    root = Path(tempfile.mkdtemp(prefix="tq-night-"))
    try:
        model, data, model_name = prepare(root, args.full)
        emit(figure="night", model="FLAN-T5-base architecture" if args.full else "tiny-t5", points=len(points),
             test_examples=args.test_limit, fixed=FIXED, max_new_tokens=MAX_NEW_TOKENS,
             batch_size=args.batch_size or "each side's default",
             max_steps=args.max_steps, cpu=cpu_model(), cpus=os.cpu_count(),
             load_avg_1_5_15_at_start=[round(x, 2) for x in os.getloadavg()],
             repeats="each side runs once, one after the other (a night is too long to repeat 5 times); "
                     "not interleaved pairs")
        peers = run_peers(root, model, data, points, args)
        ours = {side_name(k): run_tunequeue(root, root / "model-home", model_name, points, args, cotrain=k)
                for k in cotrains}
        for name, side in (("peers", peers), *ours.items()):
            extra = {"jobs": side["jobs"], "commands_s": side["commands_s"],
                     "base_rouge1": side["base_rouge1"]} if name != "peers" else {}
            emit(side=name, wall_s=sig(side["wall_s"]), runs=1,
                 rouge1_mean=round(statistics.mean(side["rouge1"]), 4), rouge1_max=round(max(side["rouge1"]), 4),
                 parts_s={k: sig(v) for k, v in side["parts"].items()},
                 unaccounted_s=sig(side["wall_s"] - sum(side["parts"].values())), **extra)
        for name, side in ours.items():
            gap = statistics.mean(side["rouge1"]) - statistics.mean(peers["rouge1"])
            holds = gap >= -QUALITY_MARGIN
            emit(ratio=f"night wall: peers / {name}", value=sig(peers["wall_s"] / side["wall_s"]), runs=1,
                 target=3, rouge1_mean_difference=round(gap, 4), quality_holds=holds,
                 counts=holds, note="one run of each side, not pairs: compare with the machine line's load")
        emit_machine()
    finally:
        leave(root, args.keep)


if __name__ == "__main__":
    main()
