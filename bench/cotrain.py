"""Co-training, side by side in one run: K points of the night's sweep (bench/night.py: learning rate 1e-3, 2e-3,
3e-3, 5e-3 × LoRA rank 8, 16; alpha 32 on q,v; batch 8; one epoch of synthetic-dialogsum's training split; tiny-t5)
trained one after another with `train_adapter`, as a worker runs a sweep today, against all K together in one pass
over the resident base with `train_adapters_together` (worker/jobs/cotrain.py). Both sides call the plain functions
on one resident base in one process (fresh home, SQLite database); the tokenization cache and the untrained eval
loss are shared, as in a worker. After an untrained warm-up of a few steps per side, the sides take turns `--pairs`
times (bench/_common.py's `interleave`); the ratio is taken pair by pair. Quality: each side's mean final eval loss
over the K points (the same batches and seed, so they should agree to float rounding).

    python bench/cotrain.py                  # 8 points, one epoch (250 steps) each, 5 pairs: ~20 min on 2 cores
    python bench/cotrain.py --steps 50       # 50 steps per point
    python bench/cotrain.py --tiny           # a smoke run: 2 points, 10 steps
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import argparse  # noqa: E402
import functools  # noqa: E402
import itertools  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from bench._common import (add_bench_args, emit, emit_machine, interleave, paired_ratio, rate, rates,  # noqa: E402
                           setup, sig)

GRID = {"learning_rate": [1e-3, 2e-3, 3e-3, 5e-3], "lora_r": [8, 16]}
FIXED = {"model": "tiny-t5", "dataset": "synthetic-dialogsum", "target_modules": ["q", "v"], "lora_alpha": 32,
         "num_train_epochs": 1, "per_device_train_batch_size": 8, "max_source_length": 256, "max_target_length": 64}


def points(count: int, steps: int | None, eval_limit: int | None) -> list[dict]:
    keys = list(GRID)
    grid = [dict(zip(keys, values)) for values in itertools.product(*GRID.values())]
    if count > len(grid):
        raise SystemExit(f"--points: at most {len(grid)}")
    extra = {**({"max_steps": steps} if steps else {}), **({"eval_limit": eval_limit} if eval_limit else {})}
    return [{**FIXED, **point, **extra} for point in grid[:count]]


class Side:
    """One way of training the K points; calling it trains them all once and keeps the summaries."""

    def __init__(self, name: str, train, point_specs: list[dict], session, cache, home: Path):
        from models.specs import FinetuneSpec

        self.name, self.train, self.session, self.cache, self.home = name, train, session, cache, home
        self.specs = [FinetuneSpec(**spec, name=f"{name}-{i}") for i, spec in enumerate(point_specs)]
        self.results: list[dict] = []
        self.parts: list[dict] = []  # per call: seconds of each part of the jobs (their results' timings), summed

    def __call__(self) -> None:
        self.results = self.train(self.specs, self.session, self.cache, self.home)
        runs = self.results[:1] if "together" in self.name else self.results  # one pass: one set of timings
        parts: dict = {}
        for result in runs:
            for key, seconds in result["timings"].items():
                parts[key] = parts.get(key, 0.0) + seconds
        self.parts.append(parts)

    @property
    def train_seconds(self) -> list[float]:
        """Per call: the training steps with their periodic evaluations (no data preparation, untrained eval loss,
        save or record)."""
        return [parts["train_s"] for parts in self.parts]


def one_by_one(specs, session, cache, home) -> list[dict]:
    from worker.jobs.finetune import train_adapter

    return [train_adapter(spec, session, cache, home) for spec in specs]


def together(specs, session, cache, home, mode: str = "bmm") -> list[dict]:
    from worker.jobs.cotrain import train_adapters_together

    return train_adapters_together(specs, session, cache, home, mode=mode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=None, help="K points of the 4 × 2 grid [8; --tiny: 2]")
    parser.add_argument("--steps", type=int, default=None, help="steps per point [one epoch, 250; --tiny: 10]")
    parser.add_argument("--eval-limit", type=int, default=None, help="eval examples per point [200; --tiny: 16]")
    parser.add_argument("--tiny", action="store_true", help="a smoke run: 2 points, 10 steps, 16 eval examples")
    parser.add_argument("--loop", action="store_true",
                        help="also time the hooks' per-block form (mode=loop) against their batched-matmul form")
    add_bench_args(parser)
    args = parser.parse_args()
    setup(args)
    count = args.points or (2 if args.tiny else 8)
    steps = args.steps or (10 if args.tiny else None)
    eval_limit = args.eval_limit or (16 if args.tiny else None)

    from models import make_session_factory
    from models.migrate import upgrade
    from worker.ml.model_cache import ModelCache

    home = Path(tempfile.mkdtemp(prefix="tq-cotrain-"))
    try:
        url = f"sqlite:///{home / 'tunequeue.db'}"
        upgrade(url)
        session = make_session_factory(url)()
        cache = ModelCache(home, device="cpu")
        cache.get("tiny-t5")
        specs = points(count, steps, eval_limit)
        sides = {"one_by_one": Side("one_by_one", one_by_one, specs, session, cache, home),
                 "together": Side("together", together, specs, session, cache, home)}
        if args.loop:  # the hooks' per-block form as a third side; "together", in the middle, runs next to both
            sides["together_loop"] = Side("together_loop", functools.partial(together, mode="loop"), specs, session,
                                          cache, home)
        warm = {name: Side(f"warm-{name}", side.train, [{**s, "max_steps": 3} for s in specs], session, cache, home)
                for name, side in sides.items()}
        for side in warm.values():  # imports, the tokenization cache, the untrained eval loss: untimed
            side()
        seconds = interleave(sides, args.pairs, "cpu", warmup=False)
        total_steps = sum(r["steps"] for r in sides["one_by_one"].results)
        figures, train_rates = {}, {}
        for name, side in sides.items():
            eval_losses = [r["eval_loss"] for r in side.results]
            figures[name] = rates(total_steps, seconds[name])
            train_rates[name] = rates(total_steps, side.train_seconds)
            parts = {key: sig(statistics.median(p[key] for p in side.parts)) for key in side.parts[0]}
            emit(figure=name, points=count, steps_per_point=side.results[0]["steps"],
                 **rate("point_steps_per_s", figures[name]), **rate("wall_s", seconds[name]),
                 **rate("training_point_steps_per_s", train_rates[name]), parts_s_median=parts,
                 eval_loss_mean=round(statistics.mean(eval_losses), 5), eval_loss_max=round(max(eval_losses), 5),
                 train_loss_mean=round(statistics.mean(r["train_loss"] for r in side.results), 5))
        gap = (statistics.mean(r["eval_loss"] for r in sides["together"].results)
               - statistics.mean(r["eval_loss"] for r in sides["one_by_one"].results))
        emit(ratio="together / one_by_one point_steps_per_s, whole calls (K train_adapter calls vs one pass)",
             **paired_ratio(figures["together"], figures["one_by_one"]), eval_loss_mean_difference=sig(gap))
        emit(ratio="together / one_by_one training_point_steps_per_s, the steps only (train_s of the timings)",
             **paired_ratio(train_rates["together"], train_rates["one_by_one"]))
        if args.loop:
            emit(ratio="together (bmm) / together_loop training_point_steps_per_s",
                 **paired_ratio(train_rates["together"], train_rates["together_loop"]))
        emit_machine()
        session.close()
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
