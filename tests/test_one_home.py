"""Each fact has one home: job options come from the spec fields, built-ins from one registry, metric names from
the metric table, errors from one tree."""

from __future__ import annotations

import typing

import click
import pytest
from click.testing import CliRunner

import manage
from models.builtins import BUILTIN_DATASETS, BUILTIN_MODELS
from models.errors import InputError, NotFound, TunequeueError, Unavailable
from models.metrics import FAMILY_FOR_MODEL_KIND, METRIC_FAMILIES, METRIC_NEEDS, expand_metrics, metric_families
from models.specs import MODEL_KINDS, NOT_OPTIONS, FinetuneSpec, GenerateSpec, ScoreSpec, option


def params_of(command: click.Command) -> dict[str, click.Parameter]:
    return {p.name: p for p in command.params}


@pytest.mark.parametrize("spec_type, command", [(FinetuneSpec, manage.finetune), (GenerateSpec, manage.generate)])
def test_every_spec_field_is_an_option_with_its_help_and_choices(spec_type, command):
    params = params_of(command)
    for name, field in spec_type.model_fields.items():
        if name == "kind" or name in NOT_OPTIONS:
            continue
        param = params[name]  # KeyError: a spec field without its CLI option
        assert field.description in param.help, name
        options = [a for a in typing.get_args(field.annotation) if a is not type(None)]
        base = options[0] if typing.get_origin(field.annotation) is typing.Union and len(options) == 1 \
            else field.annotation
        if typing.get_origin(base) is typing.Literal:  # a choice (target_modules, 'all-linear' or a list, is not)
            assert list(param.type.choices) == list(typing.get_args(base)), name
        default = field.get_default(call_default_factory=True)
        shown = (field.json_schema_extra or {}).get("shown")
        if field.is_required():
            assert param.required, name
            continue
        if shown or default not in (None, [], False):
            assert f"[default: {shown or default}]" in param.help, name
        assert param.default in (None, False), f"{name}: the CLI must leave defaults to the spec"


def test_a_new_spec_field_becomes_an_option_with_nothing_else_to_write():
    class Extended(FinetuneSpec):
        label_smoothing: float = option(0.1, "Label smoothing of the loss.", "--smooth", ge=0, le=1)

    @click.command()
    @manage.spec_options(Extended, "label_smoothing")
    def command(**fields):
        click.echo(repr(Extended.model_validate({"name": "x", **{k: v for k, v in fields.items() if v is not None}})
                        .label_smoothing))

    assert CliRunner().invoke(command, []).output.strip() == "0.1"  # the spec's default
    assert CliRunner().invoke(command, ["--smooth", "0.3"]).output.strip() == "0.3"
    assert "Label smoothing of the loss. [default: 0.1]" in " ".join(CliRunner().invoke(command, ["--help"]).output.split())


def test_flags_keep_their_aliases():
    finetune = params_of(manage.finetune)
    assert {"--lr", "--learning-rate"} <= set(finetune["learning_rate"].opts)
    assert {"--model-kind", "--task"} <= set(finetune["model_kind"].opts)
    assert set(finetune["num_train_epochs"].opts) == {"--epochs"}
    assert {"--split", "--test-split"} <= set(params_of(manage.generate)["split"].opts)
    assert params_of(manage.score)["metrics"].opts == ["--metric"]


def test_the_spec_accepts_the_old_name_of_the_model_kind():
    assert FinetuneSpec.model_validate({"name": "x", "task": "causal"}).model_kind == "causal"  # rows and sweep files
    assert "model_kind" in FinetuneSpec(name="x").model_dump()


def test_builtins_have_one_registry(builtin_home):
    from worker.data.examples import GENERATORS
    from worker.ml.builtin import BUILDERS
    from worker.ml.kinds import detect_model_kind, model_kind_from_config, read_config

    assert set(BUILDERS) == set(BUILTIN_MODELS) and set(GENERATORS) == set(BUILTIN_DATASETS)
    for name, builtin in BUILTIN_MODELS.items():
        assert detect_model_kind(name) == builtin.model_kind
        built = read_config(str(builtin_home / "builtin" / name))  # what the built weights say, from their config
        assert model_kind_from_config(built) == builtin.model_kind, name
    for name, builtin in BUILTIN_DATASETS.items():
        row = next(iter(GENERATORS[name]("test")))
        assert set(builtin.column_names) <= set(row), name
    assert all(kind in MODEL_KINDS for kind in FAMILY_FOR_MODEL_KIND) and set(FAMILY_FOR_MODEL_KIND) == set(MODEL_KINDS)


def test_metric_names_live_beside_the_metric_table():
    assert params_of(manage.score)["metrics"].multiple
    assert set(METRIC_FAMILIES) < set(METRIC_NEEDS)  # every family has its line in score --help
    assert all(f"  {name}: {needs}" in manage.score.help for name, needs in METRIC_NEEDS.items())
    assert expand_metrics(["rouge", "rouge1", "accuracy"]) == ["rouge1", "rouge2", "rougeL", "rougeLsum", "accuracy"]
    assert metric_families(None, "classification", 7) == ["classification"]
    with pytest.raises(InputError, match="generate job 7 is a causal job: score it with --metric rouge / bleu"):
        metric_families(["classification"], "causal", 7)


def test_one_error_tree_with_its_exit_codes():
    assert issubclass(NotFound, InputError) and issubclass(InputError, TunequeueError)
    assert InputError.exit_code == 2 and Unavailable.exit_code == 1

    @manage.cli.command("raise-for-test")
    @click.argument("which")
    def raiser(which):
        raise {"input": InputError("bad --thing"), "unavailable": Unavailable("cannot reach x")}[which]

    try:
        for which, code, text in [("input", 2, "bad --thing"), ("unavailable", 1, "cannot reach x")]:
            result = CliRunner().invoke(manage.cli, ["raise-for-test", which])
            assert result.exit_code == code and result.output == f"Error: {text}\n", result.output
    finally:
        manage.cli.commands.pop("raise-for-test")
