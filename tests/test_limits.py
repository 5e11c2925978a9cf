"""Limits (issue 13): nothing a user types, puts in a sweep file or sets in the environment ends in a traceback, fills
the memory or lands inside the store; every such error is one line and exit 2 (exit 1: a service is unreachable),
and no error message prints a secret or a whole input.

Fast: no training and no worker. The table of bad inputs shares one SQLite database (refused commands write
nothing, and check_rejected asserts that they did not).
"""

from __future__ import annotations

import math
import os
import time
import uuid
from pathlib import Path

import pytest
import redis
import yaml
from click.testing import CliRunner

from api.sweeps import MAX_POINTS, apply_overrides, expand, load_sweep_file
from manage import cli as manage_cli
from models.errors import InputError
from models.settings import Settings, mask_url
from models.specs import MAX_ID, SPEC_TYPES, FinetuneSpec, ScoreSpec, Submission, brief, build, validate_name
from tests.conftest import REDIS_URL, RUN_ID, check_rejected, cli, session_of, sqlite_home

BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))  # 10**9 leaves
SECRETS = ("hunter2", "p@ss", "ss@", "sekrit", "tok3n")


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def shared(tmp_path_factory, builtin_home):
    """One SQLite home for the table of refused commands, with one LoRA adapter row and its folder, and a folder
    of sweep files and other awkward paths."""
    from models.results import Adapter

    home, url = sqlite_home(tmp_path_factory, builtin_home, "limits-home")
    env = {**os.environ, "TUNEQUEUE_HOME": str(home), "DATABASE_URL": url, "REDIS_URL": REDIS_URL,
           "TUNEQUEUE_QUEUE": f"tq-test-{RUN_ID}-{uuid.uuid4().hex[:6]}", "PYTHONUNBUFFERED": "1"}
    for key in ("TUNEQUEUE_HEARTBEAT_SECONDS", "TUNEQUEUE_STALE_SECONDS", "TUNEQUEUE_REAP_SECONDS",
                "TUNEQUEUE_MODEL_CACHE_BYTES"):
        env.pop(key, None)
    folder = home / "adapters" / "kept"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    with session_of(env) as session:
        session.add(Adapter(name="kept", base_model="tiny-t5", method="lora", model_kind="seq2seq",
                            hyperparameters={}, path="adapters/kept", size_bytes=2, trainable_params=1,
                            total_params=10))
        session.commit()
    files = tmp_path_factory.mktemp("limits-files")
    (files / "a-file").write_text("not a folder")
    sweeps = {
        "bomb.yaml": "name: bomb\n" + BILLION_LAUGHS + "grid: {seed: *i}\n",
        "grid.yaml": yaml.safe_dump({"name": "big", "grid": {k: list(range(1, 11)) for k in [
            "lora_r", "seed", "warmup_steps", "max_steps", "eval_steps", "lora_alpha", "eval_limit", "train_limit"]}}),
        "n.yaml": "name: many\nrandom: {n: 1000000000, lora_dropout: {low: 0.0, high: 0.2}}\n",
        "choices.yaml": "name: empty\nrandom: {n: 2, lora_dropout: {choices: []}}\n",
        "newline.yaml": yaml.safe_dump({"name": "ends\n", "grid": {"lora_r": [8]}}),
        "huge.yaml": "name: huge\nbase: {prompt_template: '" + "{dialogue} " * 40_000 + "'}\n",
        "inf.yaml": "name: inf\ngrid: {lora_alpha: [.inf]}\n",
    }
    for name, text in sweeps.items():
        (files / name).write_text(text)
    yield {"env": env, "home": home, "files": files}
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"*{env['TUNEQUEUE_QUEUE']}*"):
        client.delete(key)


@pytest.fixture
def shared_env(shared, monkeypatch):
    """The shared environment applied to this process, for in-process CLI calls."""
    for key, value in shared["env"].items():
        if key.startswith(("TUNEQUEUE_", "DATABASE_URL", "REDIS_URL")):
            monkeypatch.setenv(key, value)
    for key in ("TUNEQUEUE_HEARTBEAT_SECONDS", "TUNEQUEUE_STALE_SECONDS", "TUNEQUEUE_REAP_SECONDS",
                "TUNEQUEUE_MODEL_CACHE_BYTES"):
        monkeypatch.delenv(key, raising=False)
    return shared["env"]


def fill(args: list[str], shared: dict) -> list[str]:
    """{files} and {home} in the arguments of a table row, made real paths."""
    return [a.format(files=shared["files"], home=shared["home"]) for a in args]


# ------------------------------------------------------------- class 12: one line and exit 2, never a traceback
BIG = "99999999999999999999"  # past 2**63
REFUSED = [
    # references too long for a path or a hub id, and hub ids matched whole
    (["finetune", "--name", "a", "--dataset", "x" * 5000], "is 5000 characters long; at most 1024"),
    (["finetune", "--name", "a", "--dataset", "x" * 300], "is not a valid Hugging Face hub id"),
    (["finetune", "--name", "a", "--model", "org/name\n"], "unknown model"),
    # ids and counts past 2**63 (an OverflowError in the driver before)
    (["jobs", "show", BIG], "not in the range 1<=x<=9223372036854775807"),
    (["jobs", "cancel", BIG], "not in the range"),
    (["jobs", "watch", BIG], "not in the range"),
    (["score", BIG], "not in the range"),
    (["score", str(MAX_ID)], f"job {MAX_ID} does not exist"),
    (["jobs", "list", "--limit", BIG], "not in the range"),
    (["report", "--top", BIG], "not in the range"),
    (["report", "--compare", "a", "b", "--limit", "-3"], "not in the range"),
    (["jobs", "reconcile", "--stale-after", "nan"], "not a number of seconds above 0"),
    (["jobs", "reconcile", "--stale-after", "inf"], "not a number of seconds above 0"),
    (["jobs", "reconcile", "--stale-after", "0.001"], "--stale-after 0.001 is not more than the heartbeat interval"),
    (["adapters", "show", "x" * 5000], "adapter 'xxxxxxxxxxxxxxxxxxxxxxxxxxx...xxxxxxxxxxxxxxxxxxxxxxxxxxxx' does not"),
    (["flower", "--port", "700000"], "not in the range"),
    # report plots: the destination is checked before anything is queried or drawn
    (["report", "--plot", "{files}/no-such-folder/box.png"], "no-such-folder does not exist"),
    (["report", "--plot-loss", "{files}/a-file/loss.png"], "a-file is not a folder"),
    (["report", "--plot", "{files}"], "is a directory"),
    (["report", "--plot", "{files}/box.docx"], "cannot write a .docx image"),
    # hyperparameters without bounds (class 8a)
    (["finetune", "--name", "a", "--lora-alpha", "inf"], "lora_alpha: Input should be a finite number"),
    (["finetune", "--name", "a", "--lora-alpha", "1e308"], "lora_alpha: Input should be less than or equal to 10000"),
    (["finetune", "--name", "a", "--lora-dropout", "nan"], "lora_dropout: Input should be a finite number"),
    (["finetune", "--name", "a", "--seed", "100000000000000000000000"], "seed: Input should be less than or equal"),
    (["finetune", "--name", "a", "--seed", "-1"], "seed: Input should be greater than or equal to 0"),
    (["finetune", "--name", "a", "--max-steps", "99999999999"], "max_steps: Input should be less than or equal"),
    (["finetune", "--name", "a", "--warmup-steps", BIG], "warmup_steps: Input should be less than or equal"),
    (["finetune", "--name", "a", "--max-grad-norm", "inf"], "max_grad_norm: Input should be a finite number"),
    (["finetune", "--name", "a", "--time-limit", "1e300"], "time_limit_s: Input should be less than or equal"),
    (["finetune", "--name", "a", "--checkpoint-every-minutes", "nan"], "checkpoint_every_minutes: Input should be a"),
    (["finetune", "--name", "a", "--train-limit", BIG], "train_limit: Input should be less than or equal"),
    (["finetune", "--name", "a", "--eval-steps", BIG], "eval_steps: Input should be less than or equal"),
    (["generate", "--limit", BIG], "limit: Input should be less than or equal"),
    (["demo", "--epochs", "inf"], "num_train_epochs: Input should be a finite number"),
    (["demo", "--learning-rates", "fast,slow"], "--learning-rates 'fast,slow': write numbers"),
    # names that end in a newline (class 11)
    (["finetune", "--name", "a\n"], "name: must be 1-64 letters"),
    (["sweep", "{files}/newline.yaml", "--dry-run"], "sweep name 'ends\\n': must be 1-64 letters"),
    (["sweep", "{files}/choices.yaml", "--name", "ok\n", "--dry-run"], "sweep name 'ok\\n'"),
    # sweep files (class 6)
    (["sweep", "{files}/bomb.yaml", "--dry-run"], "aliases expand to more than 100,000 values"),
    (["sweep", "{files}/grid.yaml", "--dry-run"], "the sweep expands to 100000000 points; more than 1000"),
    (["sweep", "{files}/n.yaml", "--dry-run"], "the sweep expands to 1000000000 points"),
    (["sweep", "{files}/choices.yaml", "--dry-run"], "random.lora_dropout.choices: must be a non-empty list"),
    (["sweep", "{files}/huge.yaml", "--dry-run"], "is larger than 256 KiB"),
    (["sweep", "{files}/inf.yaml", "--dry-run"], "grid.lora_alpha[0]: must be a finite number"),
    (["sweep", "{files}/choices.yaml", "random.n=&a [*a]", "--dry-run"], "an alias refers to the block"),
    (["sweep", "{files}/choices.yaml", "grid.seed=" + "[" * 80 + "]" * 80, "--dry-run"], "nested more than 50"),
    # adapter destinations (classes 5 and 12)
    (["adapters", "export", "kept", "{home}/exports/kept"], "is inside TUNEQUEUE_HOME"),
    (["adapters", "export", "kept", "{home}"], "is inside TUNEQUEUE_HOME"),
    (["adapters", "merge", "kept", "{home}/adapters/merged"], "is inside TUNEQUEUE_HOME"),
    (["adapters", "export", "kept", "{files}/a-file/export"], "a-file is not a folder"),
    (["adapters", "merge", "kept", "{files}/a-file/deeper/merged"], "a-file is not a folder"),
]


@pytest.mark.parametrize("args, expected", REFUSED, ids=[" ".join(a)[:60] for a, _ in REFUSED])
def test_refused_in_one_line(shared, shared_env, args, expected):
    started = time.monotonic()
    check_rejected(shared_env, fill(args, shared), expected)
    assert time.monotonic() - started < 20, "a refusal must come fast"


ENV_REFUSED = [  # (variables, command, expected, exit code)
    ({"DATABASE_URL": "foo://x"}, ["jobs", "list"], "DATABASE_URL='foo://x': unsupported database 'foo'", 2),
    ({"DATABASE_URL": "not a url"}, ["jobs", "list"], "DATABASE_URL='not a url': not a database URL", 2),
    ({"DATABASE_URL": "mysql://u:hunter2@db/x"}, ["jobs", "list"], "DATABASE_URL='mysql://u:***@db/x'", 2),
    ({"DATABASE_URL": "sqlite://somehost/x.db"}, ["jobs", "list"], "a SQLite URL names a file, not a host", 2),
    ({"TUNEQUEUE_HEARTBEAT_SECONDS": "abc"}, ["jobs", "list"], "TUNEQUEUE_HEARTBEAT_SECONDS='abc': not a number", 2),
    ({"TUNEQUEUE_HEARTBEAT_SECONDS": "-5"}, ["jobs", "list"], "TUNEQUEUE_HEARTBEAT_SECONDS='-5': must be", 2),
    ({"TUNEQUEUE_REAP_SECONDS": "nan"}, ["jobs", "list"], "TUNEQUEUE_REAP_SECONDS='nan': must be", 2),
    ({"TUNEQUEUE_STALE_SECONDS": "5"}, ["jobs", "list"], "must be more than TUNEQUEUE_HEARTBEAT_SECONDS", 2),
    ({"TUNEQUEUE_MODEL_CACHE_BYTES": "lots"}, ["jobs", "list"], "TUNEQUEUE_MODEL_CACHE_BYTES: not a size: 'lots'", 2),
    ({"TUNEQUEUE_MODEL_CACHE_BYTES": "-1GiB"}, ["jobs", "list"], "TUNEQUEUE_MODEL_CACHE_BYTES: not a size", 2),
    ({"TUNEQUEUE_HOME": "{files}/a-file"}, ["jobs", "list"], "TUNEQUEUE_HOME=", 2),
    # unreachable services: exit 1, and the password (query parameter or one with an '@') is never printed
    ({"DATABASE_URL": "postgresql://u:p@ss@127.0.0.1:1/db"}, ["jobs", "list"],
     "postgresql+psycopg://u:***@127.0.0.1:1/db", 1),
    ({"DATABASE_URL": "postgresql://127.0.0.1:1/db?password=sekrit"}, ["jobs", "list"], "?password=***", 1),
    ({"REDIS_URL": "redis://:hunter2@127.0.0.1:1/0"}, ["generate", "--limit", "2"], "redis://:***@127.0.0.1:1/0", 1),
    ({"REDIS_URL": "redis://127.0.0.1:1/0?password=tok3n"}, ["generate", "--limit", "2"], "?password=***", 1),
]


@pytest.mark.parametrize("variables, args, expected, code", ENV_REFUSED,
                         ids=[f"{k}={v}"[:50] for vs, *_ in ENV_REFUSED for k, v in vs.items()])
def test_bad_environment_is_one_line(shared, shared_env, monkeypatch, variables, args, expected, code):
    for key, value in variables.items():
        monkeypatch.setenv(key, value.format(files=shared["files"]))
    result = CliRunner().invoke(manage_cli, args)
    assert result.exit_code == code, result.output + repr(result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert expected in result.output, result.output
    assert not any(secret in result.output for secret in SECRETS), result.output


@pytest.mark.parametrize("variables, args, expected, code", [
    ({"DATABASE_URL": "foo://x"}, ["jobs", "list"], "unsupported database 'foo'", 2),
    ({"TUNEQUEUE_HEARTBEAT_SECONDS": "abc"}, ["workers"], "TUNEQUEUE_HEARTBEAT_SECONDS='abc'", 2),
    ({}, ["jobs", "show", BIG], "not in the range", 2),
    ({}, ["report", "--plot", "/proc/no-such-folder/box.png"], "does not exist", 2),
    ({"DATABASE_URL": "postgresql://u:p@ss@127.0.0.1:1/db"}, ["jobs", "list"], "u:***@127.0.0.1:1/db", 1),
])
def test_as_a_user_sees_it(shared, variables, args, expected, code):
    """In a separate process, as a user runs it: no traceback on stderr, one Error line, the exit code."""
    result = cli({**shared["env"], **variables}, *args, timeout=60)
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert not any(secret in result.stderr for secret in SECRETS), result.stderr


# ------------------------------------------------------------------------- class 8a: every number has a range
def _numeric(annotation) -> type | None:
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation
    return base if base in (int, float) else None


MINIMAL = {"finetune": {"name": "a"}, "generate": {}, "score": {"generate_job_id": 1}}
NUMERIC_FIELDS = [(spec, name) for spec in [*SPEC_TYPES.values(), Submission]
                  for name, field in spec.model_fields.items() if _numeric(field.annotation)]


@pytest.mark.parametrize("spec, name", NUMERIC_FIELDS, ids=[f"{s.__name__}.{n}" for s, n in NUMERIC_FIELDS])
def test_every_numeric_field_is_bounded_and_finite(spec, name):
    field = spec.model_fields[name]
    assert any(hasattr(m, "le") or hasattr(m, "lt") for m in field.metadata), f"{spec.__name__}.{name}: no upper bound"
    base = MINIMAL.get(getattr(spec.model_fields.get("kind"), "default", None), {})
    for value in ([10**30, 1e300] + ([math.inf, -math.inf, math.nan] if _numeric(field.annotation) is float else [])):
        with pytest.raises(InputError, match=name):
            build(spec, {**base, name: value})
    build(spec, base)  # the defaults are within the ranges


def test_ids_are_64_bit():
    assert ScoreSpec(generate_job_id=MAX_ID).generate_job_id == 2**63 - 1
    with pytest.raises(InputError, match="generate_job_id: Input should be less than or equal to 9223372036854775807"):
        build(ScoreSpec, {"generate_job_id": 2**63})
    with pytest.raises(InputError, match="seed"):
        build(FinetuneSpec, {"name": "a", "seed": 2**32})  # numpy and torch take 32-bit seeds
    assert build(FinetuneSpec, {"name": "a", "seed": 2**32 - 1}).seed == 2**32 - 1


# ------------------------------------------------------------------------ class 11: the whole name must match
@pytest.mark.parametrize("name", ["a\n", "a\r\n", "\na", "a b", "a\x00", "base", "x" * 65, "-a", ".a"])
def test_names_must_match_whole(name):
    with pytest.raises(ValueError):
        validate_name(name)
    with pytest.raises(InputError, match="name: must be 1-64 letters"):
        build(FinetuneSpec, {"name": name})
    with pytest.raises(InputError, match="sweep name .*: must be 1-64 letters"):
        expand({"name": name, "grid": {"lora_r": [8]}})


def test_good_names_still_pass():
    for name in ["a", "A.b_c-9", "x" * 64]:
        assert validate_name(name) == name


# -------------------------------------------------------------------------------------- class 6: sweep limits
def test_billion_laughs_is_refused_while_reading(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text("name: bomb\n" + BILLION_LAUGHS)
    assert len(path.read_bytes()) < 500
    started = time.monotonic()
    with pytest.raises(InputError, match="aliases expand to more than 100,000 values"):
        load_sweep_file(str(path))
    assert time.monotonic() - started < 2
    with pytest.raises(InputError, match="override 'base.target_modules=.*aliases expand"):
        apply_overrides({"name": "x"}, ["base.target_modules=" + BILLION_LAUGHS.replace("\n", ", ").join("{}")])


def test_a_few_aliases_still_work(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("name: anchors\nbase: {max_steps: &steps 10, eval_steps: *steps}\n"
                    "grid: {lora_r: &r [4, 8], num_virtual_tokens: *r}\n")
    plan = expand(load_sweep_file(str(path)))
    assert len(plan.points) == 4 and plan.points[3].varied == {"lora_r": 8, "num_virtual_tokens": 8}
    assert (plan.points[0].finetune.max_steps, plan.points[0].finetune.eval_steps) == (10, 10)


@pytest.mark.parametrize("text, message", [
    ("a: &a [1, *a]\n", "an alias refers to the block that contains it"),
    ("a: " + "[" * 60 + "]" * 60 + "\n", "nested more than 50 levels deep"),
    ("a: " + "9" * 5000 + "\n", "holds a value that cannot be read"),
    ("a: [1, 2\nb: 3\n", "is not valid YAML at line"),
])
def test_awkward_yaml_is_one_line(tmp_path, text, message):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as err:
        load_sweep_file(str(path))
    assert "\n" not in str(err.value) and len(str(err.value)) < 300


def test_points_are_counted_before_any_is_built(monkeypatch):
    from types import SimpleNamespace

    import api.sweeps as sweeps

    def refuse(*_args, **_kwargs):
        raise AssertionError("points were built before they were counted")

    monkeypatch.setattr(sweeps, "itertools", SimpleNamespace(product=refuse))
    monkeypatch.setattr(sweeps, "_sample", refuse)
    grid = {k: list(range(1, 11)) for k in ["lora_r", "seed", "warmup_steps", "max_steps", "eval_steps",
                                            "lora_alpha", "eval_limit", "train_limit"]}
    with pytest.raises(InputError, match="expands to 100000000 points"):
        expand({"name": "big", "grid": grid})
    with pytest.raises(InputError, match="expands to 1000000000 points"):
        expand({"name": "many", "random": {"n": 10**9, "lora_dropout": {"low": 0.0, "high": 0.2}}})
    with pytest.raises(InputError, match="expands to 2000 points"):
        expand({"name": "many", "grid": {"lora_r": [4, 8]}, "random": {"n": 1000, "seed": 1, "lora_r": [1, 2]}})
    with pytest.raises(InputError, match="expands to more than 10\\*\\*18 points"):
        expand({"name": "huge", "grid": {k: [1] * 1000 for k in ["lora_r", "seed", "max_steps", "eval_steps",
                                                                 "warmup_steps", "eval_limit", "train_limit"]}})


def test_exactly_the_limit_is_still_a_sweep():
    plan = expand({"name": "edge", "grid": {"seed": list(range(MAX_POINTS // 2))}, "random": {"n": 2, "lora_r": [4]}})
    assert len(plan.points) == MAX_POINTS


@pytest.mark.parametrize("random_block, message", [
    ({"n": 2, "lora_dropout": {"choices": []}}, "random.lora_dropout.choices: must be a non-empty list"),
    ({"n": 2, "lora_dropout": []}, "random.lora_dropout: the list of choices is empty"),
    ({"n": 2, "lora_dropout": {"choices": 0.1}}, "random.lora_dropout.choices: must be a non-empty list (got 0.1)"),
    ({"n": 2, "lora_r": {"low": 1, "high": 1e400, "int": True}}, "must be a finite number"),
    ({"n": 2, "lora_r": {"low": 1, "high": 8, "int": "yes"}}, "random.lora_r.int: must be true or false"),
    ({"n": 2, "lora_r": {"low": 1, "hihg": 8}}, "random.lora_r.hihg: unknown key, did you mean 'high'?"),
    ({"n": True, "lora_r": [4]}, "random.n: must be a non-negative whole number (got True)"),
    ({"n": 2, "seed": [1], "lora_r": [4]}, "random.seed: must be a whole number (got [1])"),
])
def test_random_rules_are_checked_before_sampling(random_block, message):
    with pytest.raises(InputError) as err:
        expand({"name": "r", "random": random_block})
    assert message in str(err.value)


@pytest.mark.parametrize("data", [
    {"name": "long", "grid": {"lora_r": ["x" * 100_000]}},
    {"name": "long", "grid": {"y" * 100_000: [1]}},
    {"name": "long", "random": {"n": list(range(100_000)), "lora_r": [4]}},
    {"name": "long", "base": {"target_modules": [["q"] * 10_000] * 10}},
    {"name": "z" * 100_000},
])
def test_errors_never_echo_a_whole_input(data):
    with pytest.raises(InputError) as err:
        expand(data)
    assert len(str(err.value)) < 400 and "\n" not in str(err.value), str(err.value)[:500]


def test_values_json_cannot_hold_are_refused(tmp_path):
    path = tmp_path / "typed.yaml"
    path.write_text("name: typed\nbase: {dataset: !!binary aGVsbG8=}\n")
    with pytest.raises(InputError, match="base.dataset: a bytes is not allowed here"):
        expand(load_sweep_file(str(path)))


def test_brief_cuts_every_kind_of_value():
    looped: list = []
    looped.append(looped)
    for value in ["x" * 10**6, list(range(10**6)), looped, 10**5000, {"k": ["v" * 100] * 100}, "a\nb"]:
        text = brief(value)
        assert len(text) <= 60 and "\n" not in text, text


# -------------------------------------------------------------- class 5: nothing is written inside the store
def test_export_and_merge_refuse_the_home_and_links_into_it(shared, shared_env, tmp_path):
    home = shared["home"]
    link = tmp_path / "looks-outside"
    link.symlink_to(home / "adapters")
    before = sorted(p.relative_to(home) for p in home.rglob("*"))
    for command in ("export", "merge"):
        for target in (link / "copy", link, home / "cache" / "x", tmp_path / ".." / home.name / "y"):
            result = CliRunner().invoke(manage_cli, ["adapters", command, "kept", str(target)])
            assert result.exit_code == 2 and "is inside TUNEQUEUE_HOME" in result.output, (target, result.output)
            assert result.output.count("\n") == 1, result.output
    assert sorted(p.relative_to(home) for p in home.rglob("*")) == before, "something was written in the home"


def test_export_outside_survives_delete(make_env, monkeypatch, tmp_path):
    """The control: an export outside the home works, and deleting the adapter leaves the copy alone."""
    from models.results import Adapter

    env = make_env("sqlite")
    for key in ("TUNEQUEUE_HOME", "DATABASE_URL", "REDIS_URL", "TUNEQUEUE_QUEUE"):
        monkeypatch.setenv(key, env[key])
    home = Path(env["TUNEQUEUE_HOME"])
    (home / "adapters" / "doomed").mkdir(parents=True)
    (home / "adapters" / "doomed" / "adapter_config.json").write_text("{}")
    with session_of(env) as session:
        session.add(Adapter(name="doomed", base_model="tiny-t5", method="lora", model_kind="seq2seq",
                            hyperparameters={}, path="adapters/doomed", size_bytes=2, trainable_params=1,
                            total_params=10))
        session.commit()
    result = CliRunner().invoke(manage_cli, ["adapters", "export", "doomed", str(tmp_path / "out" / "copy")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(manage_cli, ["adapters", "delete", "doomed", "--yes"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "copy" / "adapter_config.json").read_text() == "{}"
    assert not (home / "adapters" / "doomed").exists()


def test_export_to_a_place_that_cannot_be_written(shared, shared_env, tmp_path):
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target, expected = locked / "export", "is not writable"
    elif Path("/sys").is_dir():
        target, expected = Path("/sys/tq-no-such-folder/export"), "could not write"
    else:
        pytest.skip("no folder here that root cannot write")
    result = CliRunner().invoke(manage_cli, ["adapters", "export", "kept", str(target)])
    assert result.exit_code == 2 and expected in result.output, result.output
    assert result.output.count("\n") == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def test_plot_to_a_place_that_cannot_be_written(shared, shared_env, tmp_path):
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target = locked / "box.png"
    elif Path("/sys").is_dir():
        target = Path("/sys/tq-box.png")
    else:
        pytest.skip("no folder here that root cannot write")
    for option in ("--plot", "--plot-loss"):
        check_rejected(shared_env, ["report", option, str(target)], f"{option} {target}: cannot write there")
    assert not target.exists()


# --------------------------------------------------------------------- class 13: secrets never in a message
@pytest.mark.parametrize("url, shown, secret", [
    ("postgresql+psycopg://u:hunter2@db/x", "postgresql+psycopg://u:***@db/x", "hunter2"),
    ("postgresql://u:p@ss@host:5432/db", "postgresql://u:***@host:5432/db", "ss@"),
    ("postgresql://u:a@b@c@host/db?sslmode=require", "postgresql://u:***@host/db?sslmode=require", "b@c"),
    ("postgresql://u:pa/ss?@host/db", "postgresql://u:***@host/db", "pa/ss"),
    ("postgresql://host/db?sslmode=require&password=sekrit", "postgresql://host/db?sslmode=require&password=***",
     "sekrit"),
    ("postgresql://host/db?passwd=a&pass=b&secret=c&token=d&key=e&access_key=f&user=me",
     "postgresql://host/db?passwd=***&pass=***&secret=***&token=***&key=***&access_key=***&user=me", None),
    ("postgresql://host/db?password=with&amp&x=1", "postgresql://host/db?password=***&x=1", "amp"),
    ("redis://:hunter2@redis:6379/0", "redis://:***@redis:6379/0", "hunter2"),
    ("redis://redis:6379/0?password=hunter2", "redis://redis:6379/0?password=***", "hunter2"),
    ("sqlite:////data/me@work/tunequeue.db", "sqlite:////data/me@work/tunequeue.db", None),
    ("postgresql://user@host/db", "postgresql://user@host/db", None),
    ("postgresql://host/db?password=x@y", "postgresql://host/db?password=***", "x@y"),
])
def test_mask_url_hides_every_credential(url, shown, secret):
    assert mask_url(url) == shown
    if secret:
        assert secret not in mask_url(url)


def test_a_password_with_an_at_sign_reaches_the_driver_whole():
    from sqlalchemy.engine import make_url

    settings = Settings.from_env({"DATABASE_URL": "postgresql://u:p@ss@db.example:5432/x"})
    parsed = make_url(settings.database_url)
    assert (parsed.username, parsed.password, parsed.host, parsed.database) == ("u", "p@ss", "db.example", "x")
    assert mask_url(settings.database_url) == "postgresql+psycopg://u:***@db.example:5432/x"


# ------------------------------------------------------------------------------- settings, read once, checked
def test_settings_that_work_still_do(tmp_path):
    fast = Settings.from_env({"TUNEQUEUE_HOME": str(tmp_path), "TUNEQUEUE_HEARTBEAT_SECONDS": "0.5",
                              "TUNEQUEUE_STALE_SECONDS": "4", "TUNEQUEUE_REAP_SECONDS": "1",
                              "TUNEQUEUE_MODEL_CACHE_BYTES": "1.5GiB", "DATABASE_URL": "", "TUNEQUEUE_QUEUE": ""})
    assert (fast.heartbeat_seconds, fast.stale_seconds, fast.reap_seconds) == (0.5, 4, 1)
    assert fast.model_cache_bytes == 3 << 29 and fast.queue == "tunequeue"
    assert fast.database_url == f"sqlite:///{tmp_path / 'tunequeue.db'}"


@pytest.mark.parametrize("variable, value", [
    ("TUNEQUEUE_HEARTBEAT_SECONDS", "abc"), ("TUNEQUEUE_HEARTBEAT_SECONDS", "0"), ("TUNEQUEUE_STALE_SECONDS", "inf"),
    ("TUNEQUEUE_REAP_SECONDS", "-1"), ("TUNEQUEUE_MODEL_CACHE_BYTES", "0"), ("TUNEQUEUE_MODEL_CACHE_BYTES", "9" * 40),
    ("DATABASE_URL", "postgresql+psycopg2://u@h/db"), ("DATABASE_URL", "://"),
])
def test_each_bad_setting_names_its_variable(variable, value):
    with pytest.raises(InputError, match=variable):
        Settings.from_env({variable: value})


# ------------------------------------------------------------------------------------ plots: whole or nothing
def test_plots_are_written_whole(tmp_path):
    from api.render import box_plot

    for name, magic in [("box.png", b"\x89PNG"), ("box.pdf", b"%PDF"), ("box", b"\x89PNG")]:
        assert box_plot({"base": [0.1, 0.4, 0.5], "a": [0.3, 0.6, 0.9]}, "rouge1", str(tmp_path / name)) == 2
        assert (tmp_path / name).read_bytes().startswith(magic)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["box", "box.pdf", "box.png"]  # no partial file left
