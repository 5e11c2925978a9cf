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

A sweep file is small, so everything about it is bounded before it can cost anything: the file's size, how deep it
nests and how many nodes its YAML aliases expand to (a 400-byte "billion laughs" file is refused while it is read),
and the number of points, counted from the lengths of the grid lists and `random.n` before any point is built.
Error messages echo at most a short piece of any value.
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
from models.search import AshaStrategy, GridStrategy, Strategy, TpeStrategy
from models.specs import ECHO_CHARS, FinetuneSpec, GenerateSpec, ScoreSpec, brief, one_line, validate_name

SWEEP_KEYS = {"name", "base", "grid", "random", "eval", "strategy"}
# the score job's own fields (metrics and their options: judge_model, bertscore_model, ...) go in the eval block too
SCORE_KEYS = set(ScoreSpec.model_fields) - {"kind", "generate_job_id"}
# include_pruned: an ASHA sweep's evaluation also covers its N best pruned points (by their last rung's metric)
EVAL_KEYS = {"split", "limit", "batch_size", "max_new_tokens", "no_repeat_ngram_size", "include_pruned"} | SCORE_KEYS
POINT_KEYS = set(FinetuneSpec.model_fields) - {"kind", "name", "search"} | {"task"}  # `task`: model_kind's older name
RULE_KEYS = {"low", "high", "log", "int", "choices"}
MAX_POINTS = 1000  # more points than this is surely a mistake
MAX_FILE_BYTES = 256 * 1024  # a sweep file is a few lines
MAX_YAML_NODES = 100_000  # nodes of a sweep file (or override) with its aliases expanded
MAX_YAML_DEPTH = 50  # nesting of a sweep file


def _cut(text: str, limit: int = ECHO_CHARS) -> str:
    text = str(text).replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit - 3] + "..."


class SweepLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses, while composing and before constructing anything, a document nested deeper than
    MAX_YAML_DEPTH, one whose aliases expand to more than MAX_YAML_NODES nodes (a few hundred bytes of nested
    aliases can stand for billions of nodes) and one whose alias refers to itself."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise InputError(f"nested more than {MAX_YAML_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        _check_expanded_size(node)
        return node


def _children(node: yaml.Node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _check_expanded_size(root: yaml.Node) -> None:
    """The node count of `root` with every alias expanded, computed once per distinct node (aliases share nodes, so
    this costs the size of the file, not of the expansion); InputError past MAX_YAML_NODES or on a cycle."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # the nodes on the path from the root to the node in hand
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > MAX_YAML_NODES:
                raise InputError(f"its aliases expand to more than {MAX_YAML_NODES:,} values; write the values out")
        elif key not in sizes:
            if key in open_nodes:
                raise InputError("an alias refers to the block that contains it")
            open_nodes.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node))


def load_yaml(text: str, what: str):
    """`text` parsed by SweepLoader; InputError naming `what` (and the line) on anything it cannot take."""
    try:
        return yaml.load(text, Loader=SweepLoader)  # noqa: S506 - SweepLoader is a SafeLoader
    except InputError as exc:
        raise InputError(f"{what}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = str(getattr(exc, "problem", None) or exc).strip().splitlines()[0]
        raise InputError(f"{what} is not valid YAML{where}: {_cut(problem, 120)}") from None
    except (ValueError, RecursionError) as exc:  # an integer of 5000 digits, ...
        raise InputError(f"{what} holds a value that cannot be read: {_cut(exc, 120)}") from None


def _check_plain(data) -> None:
    """Every value is JSON: None, a bool, a whole number, a finite float, a string, a list or a mapping with string
    keys, so the sweep can be stored as it was given (YAML also makes dates, sets and bytes; JSON has no NaN)."""
    stack, seen = [("", data)], 0
    while stack:
        path, value = stack.pop()
        seen += 1
        if seen > MAX_YAML_NODES:
            raise InputError(f"the sweep holds more than {MAX_YAML_NODES:,} values")
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise InputError(f"{_cut(path or 'sweep')}: key {brief(key)} must be a string")
                stack.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{_cut(path)}: must be a finite number (got {value})")
        elif value is not None and not isinstance(value, (bool, int, float, str)):
            raise InputError(f"{_cut(path)}: a {type(value).__name__} is not allowed here (got {brief(value)}); "
                             "quote it to make it a string")


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
    score: dict  # the evaluation's score spec fields (metrics and their options), checked
    checked: bool = False  # validated against the world (api/pipelines.validate_sweep), specs completed
    strategy: Strategy = GridStrategy()
    distributions: dict | None = None  # TPE: what each key is sampled from (Optuna's distribution JSON)

    @property
    def metrics(self) -> list[str] | None:
        return self.score.get("metrics")

    def score_spec(self, generate_job_id: int) -> ScoreSpec:
        return ScoreSpec(generate_job_id=generate_job_id, **self.score)

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
        """Fine-tunes (a TPE sweep's `n` trials), then generate + score per evaluation."""
        return self.trials + 2 * len(self.evaluations)

    @property
    def trials(self) -> int:
        return self.strategy.n if isinstance(self.strategy, TpeStrategy) else len(self.points)

    def strategy_summary(self) -> dict:
        """What the strategy will do, for a dry run: ASHA's rungs per bracket and the steps it may spend; TPE's
        trials and distributions."""
        strategy = self.strategy
        out: dict = {"kind": strategy.kind}
        if isinstance(strategy, AshaStrategy):
            brackets = {b: strategy.rungs(b) for b in range(strategy.brackets)}
            out.update(metric=strategy.metric, mode=strategy.direction, reduction_factor=strategy.reduction_factor,
                       order=strategy.order, seed=strategy.seed, promotion=strategy.promotion,
                       rungs=brackets, worst_case_steps=strategy.worst_case_steps(len(self.points)),
                       halving_steps=strategy.halving_steps(len(self.points)),
                       points_per_bracket={b: len(range(b, len(self.points), strategy.brackets)) for b in brackets})
        elif isinstance(strategy, TpeStrategy):
            out.update(metric=strategy.metric, mode=strategy.direction, n=strategy.n, parallel=strategy.parallel,
                       startup_trials=strategy.n_startup, seed=strategy.seed, distributions=self.distributions)
        return out

    @property
    def include_pruned(self) -> int:
        return self.spec.get("eval", {}).get("include_pruned") or 0


def _did_you_mean(key: str, choices) -> str:
    close = difflib.get_close_matches(key, sorted(choices), n=1)
    return f", did you mean {close[0]!r}?" if close else ""


def _check_keys(block: str, data: dict, allowed: set) -> None:
    for key in data:
        if key not in allowed:
            raise InputError(f"{block}.{_cut(key)}: unknown key{_did_you_mean(str(key)[:100], allowed)}")


def load_sweep_file(path: str) -> dict:
    shown = brief(str(path))
    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"sweep file {shown} does not exist or is not a file")
    try:
        with file.open("rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise InputError(f"cannot read sweep file {shown}: {_cut(exc.strerror or exc, 120)}") from None
    return load_sweep_text(raw, f"sweep file {shown}")


def load_sweep_text(raw: bytes, what: str) -> dict:
    """A sweep file's bytes (from a file or an HTTP body, `what` says which) parsed by SweepLoader into a mapping;
    InputError naming `what` otherwise."""
    if len(raw) > MAX_FILE_BYTES:
        raise InputError(f"{what} is larger than {MAX_FILE_BYTES // 1024} KiB; a sweep file is a few lines")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"cannot read {what}: {_cut(exc, 120)}") from None
    data = load_yaml(text, what)
    if not isinstance(data, dict):
        raise InputError(f"{what} must be a mapping with base/grid/random/eval blocks")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`key=value` (into base; replaces a grid list of that key) or `block.key=value`; values are YAML."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        shown = brief(item)
        if "=" not in item:
            raise InputError(f"override {shown} must look like key=value")
        key, raw = item.split("=", 1)
        value = load_yaml(raw, f"override {shown}")
        block, _, field = key.rpartition(".")
        if key == "name":
            data["name"] = value
            continue
        block = block or "base"
        if block not in ("base", "grid", "random", "eval", "strategy"):
            raise InputError(f"override {shown}: unknown block {brief(block)}{_did_you_mean(block, SWEEP_KEYS)}")
        if not isinstance(data.get(block) or {}, dict):
            raise InputError(f"{block}: must be a mapping of keys to values")
        data.setdefault(block, {})
        data[block] = dict(data[block] or {})
        data[block][field] = value
        if block == "base" and isinstance(data.get("grid"), dict):
            data["grid"] = {k: v for k, v in data["grid"].items() if k != field}
    return data


def _check_rule(key: str, rule) -> None:
    """A random rule is a non-empty list of choices, {choices: [...]} or {low, high[, log][, int]} with finite low
    <= high; InputError otherwise, before anything is sampled."""
    if isinstance(rule, list):
        if not rule:
            raise InputError(f"random.{key}: the list of choices is empty")
        return
    if not isinstance(rule, dict):
        raise InputError(f"random.{key}: must be a list of choices or {{low, high[, log]}} (got {brief(rule)})")
    _check_keys(f"random.{key}", rule, RULE_KEYS)
    for flag in ("log", "int"):
        if not isinstance(rule.get(flag, False), bool):
            raise InputError(f"random.{key}.{flag}: must be true or false (got {brief(rule[flag])})")
    if "choices" in rule:
        if not isinstance(rule["choices"], list) or not rule["choices"]:
            raise InputError(f"random.{key}.choices: must be a non-empty list (got {brief(rule['choices'])})")
        return
    try:
        low, high = float(rule["low"]), float(rule["high"])
    except (KeyError, TypeError, ValueError, OverflowError):
        raise InputError(f"random.{key}: needs numeric low and high (or choices)") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise InputError(f"random.{key}: low and high must be finite numbers")
    if low > high:
        raise InputError(f"random.{key}: low {low} is above high {high}")
    if rule.get("log") and low <= 0:
        raise InputError(f"random.{key}: log sampling needs low > 0")


def _sample(rng: random.Random, key: str, rule) -> object:
    if isinstance(rule, list):
        return rng.choice(rule)
    if "choices" in rule:
        return rng.choice(rule["choices"])
    low, high = float(rule["low"]), float(rule["high"])
    if rule.get("log"):
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
    else:
        value = rng.uniform(low, high)
    return int(round(value)) if rule.get("int") else float(f"{value:.4g}")


def expand(data: dict, name: str | None = None) -> SweepPlan:
    """Validate the whole file and expand it into points; raise InputError naming the point and the field."""
    if not isinstance(data, dict):
        raise InputError("a sweep is a mapping with base/grid/random/eval blocks")
    _check_keys("sweep", data, SWEEP_KEYS)
    _check_plain(data)
    sweep_name = _sweep_name(name or data.get("name"))
    blocks = _blocks(data)
    strategy = _strategy(data.get("strategy"), blocks)
    # metrics None: chosen from the model's kind when scoring
    score_fields = {k: v for k, v in blocks["eval"].items() if k in SCORE_KEYS}
    varied_points = _tpe_probes(blocks) if isinstance(strategy, TpeStrategy) else _varied_points(blocks)
    if isinstance(strategy, AshaStrategy):
        blocks = {**blocks, "base": {**blocks["base"], "max_steps": strategy.max_steps}}
    points = [_point(index, varied, sweep_name, blocks, score_fields)
              for index, varied in enumerate(varied_points, start=1)]
    if not points:
        raise InputError("the sweep has no points")
    if any(p.finetune.model != points[0].finetune.model for p in points):
        raise InputError("every point of a sweep must use the same base model (one base row per sweep)")
    from api.validate import check_metric_options

    # a local evaluate: metric must exist (kept as an absolute path), a judge needs its model, ...
    score = check_metric_options(ScoreSpec(generate_job_id=1, **score_fields))
    score_fields = {k: v for k, v in score.model_dump(mode="json").items() if k in score_fields}
    _check_strategy_fits(strategy, points)
    # TPE samples from them; ASHA records each point's params in them (Optuna keeps one space per key)
    distributions = None if isinstance(strategy, GridStrategy) else \
        _distributions(blocks, encode=isinstance(strategy, AshaStrategy))
    return SweepPlan(sweep_name, {**data, "name": sweep_name}, points, score_fields, strategy=strategy,
                     distributions=distributions)


def _sweep_name(value) -> str:
    if not value:
        raise InputError("the sweep needs a name: a top-level 'name:' in the file or --name")
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise InputError(f"sweep name {brief(value)}: must be a string")
    try:
        return validate_name(str(value))
    except ValueError as exc:
        raise InputError(f"sweep name {brief(str(value))}: {exc}") from None


def _blocks(data: dict) -> dict[str, dict]:
    """The base, grid, random and eval blocks, each a mapping with known keys; grid values non-empty lists, random
    rules checked before anything is drawn."""
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
    include = blocks["eval"].get("include_pruned", 0)
    if not isinstance(include, int) or isinstance(include, bool) or not 0 <= include <= MAX_POINTS:
        raise InputError(f"eval.include_pruned: must be a whole number of points, 0 to {MAX_POINTS} "
                         f"(got {brief(include)})")
    for key, values in blocks["grid"].items():
        if not isinstance(values, list) or not values:
            raise InputError(f"grid.{key}: must be a non-empty list of values")
    for key, rule in _random_rules(blocks).items():
        _check_rule(key, rule)
    return blocks


def _random_rules(blocks: dict) -> dict:
    return {k: v for k, v in blocks["random"].items() if k not in ("n", "seed")}


def _varied_points(blocks: dict) -> list[dict]:
    """Every grid combination, times `n` random draws when there are random rules; counted before any is built."""
    rules = _random_rules(blocks)
    n_random = blocks["random"].get("n", 1 if rules else 0)
    if not isinstance(n_random, int) or isinstance(n_random, bool) or n_random < 0:
        raise InputError(f"random.n: must be a non-negative whole number (got {brief(n_random)})")
    seed = blocks["random"].get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InputError(f"random.seed: must be a whole number (got {brief(seed)})")
    draws = max(n_random, 1) if rules else 1
    count = draws
    for values in blocks["grid"].values():
        count *= len(values)
        if count > 10**18:
            break
    if count > MAX_POINTS:
        shown = str(count) if count <= 10**18 else "more than 10**18"
        raise InputError(f"the sweep expands to {shown} points; more than {MAX_POINTS} is surely a mistake")
    rng = random.Random(seed)
    grid_keys = list(blocks["grid"])
    return [{**dict(zip(grid_keys, values)), **{k: _sample(rng, k, rule) for k, rule in rules.items()}}
            for values in itertools.product(*blocks["grid"].values()) for _ in range(draws)]


def _point(index: int, varied: dict, sweep_name: str, blocks: dict, score_fields: dict) -> SweepPoint:
    """One point's fine-tune and its evaluation's generate spec, each validated; InputError names the point."""
    fields = {**blocks["base"], **varied, "name": f"{sweep_name}-{index:02d}"}
    eval_fields = {k: v for k, v in blocks["eval"].items() if k not in SCORE_KEYS and k != "include_pruned"}
    label = _cut(", ".join(f"{k}={_cut(v, 30)}" for k, v in varied.items()), 200)
    try:
        finetune = FinetuneSpec.model_validate(fields)
        generate = GenerateSpec.model_validate({
            "adapter": finetune.name, "model": finetune.model, "dataset": finetune.dataset,
            "text_column": finetune.text_column, "summary_column": finetune.summary_column,
            "label_column": finetune.label_column, "dataset_config": finetune.dataset_config,
            "data_format": finetune.data_format, "model_kind": finetune.model_kind,
            "prompt_template": finetune.prompt_template, "seed": finetune.seed,
            # the evaluation loads the same base: it needs what the fine-tunes need
            "requires": finetune.requires, "min_gpu_mem": finetune.min_gpu_mem, **eval_fields})
        ScoreSpec.model_validate({"generate_job_id": 1, **score_fields})
    except ValueError as exc:
        message = one_line(exc) if hasattr(exc, "errors") else str(exc)
        raise InputError(f"point {index}" + (f" ({label})" if label else "") + f": {message}") from None
    return SweepPoint(index, varied, finetune, generate)


STRATEGIES = {"grid": GridStrategy, "random": GridStrategy, "asha": AshaStrategy, "tpe": TpeStrategy}
# what a strategy decides for every point, so no block of the file may set it
STRATEGY_OWNS = {"asha": ("max_steps",), "tpe": ()}


def _strategy(block, blocks: dict) -> Strategy:
    """The `strategy:` block checked as strictly as the rest of the file; grid when there is none."""
    if block is None:
        return GridStrategy()
    if not isinstance(block, dict):
        raise InputError("strategy: must be a mapping with a kind (grid, random, asha or tpe)")
    kind = block.get("kind", "grid")
    if kind not in STRATEGIES:
        raise InputError(f"strategy.kind: must be grid, random, asha or tpe (got {brief(kind)})"
                         + _did_you_mean(str(kind)[:100], STRATEGIES))
    model = STRATEGIES[kind]
    _check_keys("strategy", block, set(model.model_fields))
    try:
        strategy = model.model_validate({**block, "kind": kind})
    except ValueError as exc:
        raise InputError(f"strategy: {one_line(exc) if hasattr(exc, 'errors') else exc}") from None
    for key in STRATEGY_OWNS.get(kind, ()):
        for name in ("base", "grid", "random"):
            if key in blocks[name]:
                raise InputError(f"{name}.{key}: strategy {kind} sets each point's {key} (strategy.{key}); remove it "
                                 f"from {name}")
    if kind == "tpe":
        if "n" in blocks["random"]:
            raise InputError("random.n: a tpe strategy proposes strategy.n points; remove random.n")
        if not _random_rules(blocks) and not blocks["grid"]:
            raise InputError("strategy tpe: give the random block's distributions (and grid lists) to sample from")
    return strategy


def _check_strategy_fits(strategy: Strategy, points: list[SweepPoint]) -> None:
    """ASHA and TPE decide on a metric of the eval split, so the points need one."""
    if not isinstance(strategy, GridStrategy) and any(p.finetune.eval_split is None for p in points):
        raise InputError(f"strategy.metric {strategy.metric}: the points need an eval split to compute it on "
                         "(base.eval_split is none)")


def _tpe_probes(blocks: dict) -> list[dict]:
    """Two points at the ends of every distribution (lows / first choices, then highs / last choices): each is
    checked like a grid point, so a sampled point can only fail for a reason no corner shows."""
    ends: list[dict] = [{}, {}]
    for key, values in blocks["grid"].items():
        ends[0][key], ends[1][key] = values[0], values[-1]
    for key, rule in _random_rules(blocks).items():
        if isinstance(rule, list) or "choices" in rule:
            choices = rule if isinstance(rule, list) else rule["choices"]
            ends[0][key], ends[1][key] = choices[0], choices[-1]
        else:
            cast = (lambda v: int(round(v))) if rule.get("int") else float
            ends[0][key], ends[1][key] = cast(rule["low"]), cast(rule["high"])
    return ends


def _distributions(blocks: dict, encode: bool = False) -> dict:
    """Optuna's JSON form of what TPE samples each varied key from: grid lists and choices are categorical, low /
    high rules float or int (log when asked). `encode`: a list or mapping choice becomes its JSON text (a record,
    not a space TPE samples from)."""
    from optuna.distributions import (CategoricalDistribution, FloatDistribution, IntDistribution,
                                      distribution_to_json)

    def categorical(where: str, choices: list) -> CategoricalDistribution:
        if encode:
            choices = [param_value(c) for c in choices]
        if any(c is not None and not isinstance(c, (bool, int, float, str)) for c in choices):
            raise InputError(f"{where}: TPE samples numbers, strings and booleans only (got {brief(choices)}); fix "
                             "this key in base")
        return CategoricalDistribution(choices)

    out = {}
    for key, values in blocks["grid"].items():
        out[key] = categorical(f"grid.{key}", values)
    for key, rule in _random_rules(blocks).items():
        if isinstance(rule, list) or "choices" in rule:
            out[key] = categorical(f"random.{key}", rule if isinstance(rule, list) else rule["choices"])
        elif rule.get("int"):
            out[key] = IntDistribution(int(round(rule["low"])), int(round(rule["high"])), log=bool(rule.get("log")))
        else:
            out[key] = FloatDistribution(float(rule["low"]), float(rule["high"]), log=bool(rule.get("log")))
    import json

    return {key: json.loads(distribution_to_json(d)) for key, d in out.items()}


def param_value(value):
    """A point's value as Optuna keeps a param: itself, or its JSON text for a list or a mapping."""
    import json

    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)
