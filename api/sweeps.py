"""Sweep files: a YAML `base` block, a `grid` block of lists to combine and an optional `random` block, expanded into
fine-tune → generate → score pipelines. The whole file is validated before anything is enqueued.

```yaml
name: lr-rank                  # or --name
base:   {model: tiny-t5, num_train_epochs: 3}
grid:   {learning_rate: [1e-3, 3e-3], lora_r: [8, 16]}
random: {n: 4, seed: 0, lora_dropout: {low: 0.0, high: 0.2}, learning_rate: {low: 1e-4, high: 1e-2, log: true}}
eval:   {split: test, limit: 200}
```
Keys are `FinetuneSpec` fields (Hugging Face `TrainingArguments` names where one exists).
"""

from __future__ import annotations

import difflib
import itertools
import math
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from models.errors import InputError
from models.specs import FinetuneSpec, GenerateSpec, ScoreSpec, one_line, validate_name

SWEEP_KEYS = {"name", "base", "grid", "random", "eval"}
EVAL_KEYS = {"split", "limit", "batch_size", "max_new_tokens", "no_repeat_ngram_size", "metrics"}
POINT_KEYS = set(FinetuneSpec.model_fields) - {"kind", "name"}


@dataclass
class SweepPoint:
    index: int
    varied: dict
    finetune: FinetuneSpec
    generate: GenerateSpec


@dataclass
class Evaluation:
    """One generate job for many points: their adapters (and the base) side by side in mixed batches."""

    generate: GenerateSpec
    points: list[SweepPoint]


@dataclass
class SweepPlan:
    name: str
    spec: dict
    points: list[SweepPoint]
    metrics: list[str]

    @property
    def evaluations(self) -> list[Evaluation]:
        """Points whose generate settings agree share one multi-adapter generate job (usually the whole sweep); the
        base model rides along in the first as the "base" variant."""
        groups: dict[str, list[SweepPoint]] = {}
        for point in self.points:
            key = point.generate.model_copy(update={"adapter": None}).model_dump_json()
            groups.setdefault(key, []).append(point)
        out = []
        for number, members in enumerate(groups.values()):
            names = (["base"] if number == 0 else []) + [p.finetune.name for p in members]
            out.append(Evaluation(members[0].generate.model_copy(update={"adapter": None, "adapters": names}),
                                  members))
        return out

    @property
    def job_count(self) -> int:
        return len(self.points) + 2 * len(self.evaluations)  # fine-tunes, then generate + score per evaluation


def _did_you_mean(key: str, choices) -> str:
    close = difflib.get_close_matches(key, sorted(choices), n=1)
    return f", did you mean {close[0]!r}?" if close else ""


def _check_keys(block: str, data: dict, allowed: set) -> None:
    for key in data:
        if key not in allowed:
            raise InputError(f"{block}.{key}: unknown key{_did_you_mean(str(key), allowed)}")


def load_sweep_file(path: str) -> dict:
    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"sweep file {path!r} does not exist")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read sweep file {path!r}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise InputError(f"sweep file {path!r} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise InputError(f"sweep file {path!r} must be a mapping with base/grid/random/eval blocks")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`key=value` (into base; replaces a grid list of that key) or `block.key=value`; values are YAML."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise InputError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise InputError(f"override {item!r}: value is not valid YAML") from None
        block, _, field = key.rpartition(".")
        if key == "name":
            data["name"] = value
            continue
        block = block or "base"
        if block not in ("base", "grid", "random", "eval"):
            raise InputError(f"override {item!r}: unknown block {block!r}{_did_you_mean(block, SWEEP_KEYS)}")
        data.setdefault(block, {})
        data[block] = dict(data[block] or {})
        data[block][field] = value
        if block == "base" and isinstance(data.get("grid"), dict):
            data["grid"] = {k: v for k, v in data["grid"].items() if k != field}
    return data


def _sample(rng: random.Random, key: str, rule) -> object:
    if isinstance(rule, list):
        return rng.choice(rule)
    if not isinstance(rule, dict):
        raise InputError(f"random.{key}: must be a list of choices or {{low, high[, log]}}")
    if "choices" in rule:
        return rng.choice(rule["choices"])
    try:
        low, high = float(rule["low"]), float(rule["high"])
    except (KeyError, TypeError, ValueError):
        raise InputError(f"random.{key}: needs numeric low and high (or choices)") from None
    if low > high:
        raise InputError(f"random.{key}: low {low} is above high {high}")
    if rule.get("log"):
        if low <= 0:
            raise InputError(f"random.{key}: log sampling needs low > 0")
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
    else:
        value = rng.uniform(low, high)
    return int(round(value)) if rule.get("int") else float(f"{value:.4g}")


def expand(data: dict, name: str | None = None) -> SweepPlan:
    """Validate the whole file and expand it into points; raise InputError naming the point and the field."""
    _check_keys("sweep", data, SWEEP_KEYS)
    sweep_name = name or data.get("name")
    if not sweep_name:
        raise InputError("the sweep needs a name: a top-level 'name:' in the file or --name")
    try:
        validate_name(str(sweep_name))
    except ValueError as exc:
        raise InputError(f"sweep name {sweep_name!r}: {exc}") from None
    blocks = {}
    for block in ("base", "grid", "random", "eval"):
        value = data.get(block) or {}
        if not isinstance(value, dict):
            raise InputError(f"{block}: must be a mapping of keys to values")
        blocks[block] = value
    _check_keys("base", blocks["base"], POINT_KEYS)
    _check_keys("grid", blocks["grid"], POINT_KEYS)
    _check_keys("random", blocks["random"], POINT_KEYS | {"n", "seed"})
    _check_keys("eval", blocks["eval"], EVAL_KEYS)
    for key, values in blocks["grid"].items():
        if not isinstance(values, list) or not values:
            raise InputError(f"grid.{key}: must be a non-empty list of values")

    grid_keys = list(blocks["grid"])
    combos = [dict(zip(grid_keys, values)) for values in itertools.product(*blocks["grid"].values())]
    random_rules = {k: v for k, v in blocks["random"].items() if k not in ("n", "seed")}
    n_random = blocks["random"].get("n", 1 if random_rules else 0)
    if not isinstance(n_random, int) or n_random < 0:
        raise InputError(f"random.n: must be a non-negative whole number (got {n_random!r})")
    rng = random.Random(blocks["random"].get("seed", 0))
    varied_points = []
    for combo in combos:
        for _ in range(max(n_random, 1) if random_rules else 1):
            varied_points.append({**combo, **{k: _sample(rng, k, rule) for k, rule in random_rules.items()}})
    if len(varied_points) > 1000:
        raise InputError(f"the sweep expands to {len(varied_points)} points; more than 1000 is surely a mistake")

    evaluation = blocks["eval"]
    metrics = evaluation.get("metrics")  # None: chosen from the model's kind when scoring
    eval_fields = {k: v for k, v in evaluation.items() if k != "metrics"}
    points = []
    for index, varied in enumerate(varied_points, start=1):
        fields = {**blocks["base"], **varied, "name": f"{sweep_name}-{index:02d}"}
        label = ", ".join(f"{k}={v}" for k, v in varied.items())
        where = f"point {index}" + (f" ({label})" if label else "")
        try:
            finetune = FinetuneSpec.model_validate(fields)
            generate = GenerateSpec.model_validate({
                "adapter": finetune.name, "model": finetune.model, "dataset": finetune.dataset,
                "text_column": finetune.text_column, "summary_column": finetune.summary_column,
                "label_column": finetune.label_column, "dataset_config": finetune.dataset_config,
                "data_format": finetune.data_format, "model_kind": finetune.model_kind,
                "prompt_template": finetune.prompt_template, "seed": finetune.seed, **eval_fields})
            ScoreSpec.model_validate({"generate_job_id": 1, "metrics": metrics})
        except ValueError as exc:
            message = one_line(exc) if hasattr(exc, "errors") else str(exc)
            raise InputError(f"{where}: {message}") from None
        points.append(SweepPoint(index, varied, finetune, generate))
    if not points:
        raise InputError("the sweep has no points")
    first = points[0].finetune
    if any(p.finetune.model != first.model for p in points):
        raise InputError("every point of a sweep must use the same base model (one base row per sweep)")
    return SweepPlan(str(sweep_name), {**data, "name": str(sweep_name)}, points, metrics)
