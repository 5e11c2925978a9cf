"""Checks a spec against the world before it is enqueued: models, datasets, adapters and parent jobs exist.

`validate(spec, session, home)` returns the spec completed (model kind resolved, an adapter's base model filled
in) or raises `InputError` with a one-line message; nothing is written before every check has passed.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.builtins import BUILTIN_MODELS
from models.errors import InputError, NotFound
from models.jobs import Job, JobKind, JobStatus
from models.metrics import DEFAULT_BERTSCORE_MODEL, EVALUATE_PREFIX, evaluate_module, is_evaluate, metric_families
from models.results import Adapter
from models.specs import FinetuneSpec, GenerateSpec, ScoreSpec, parse_spec
from worker.data.examples import rules_for
from worker.data.refs import check_dataset, check_model, required_columns
from worker.metrics.bertscore import baseline_file
from worker.ml.kinds import read_config, resolve_model_kind

ACTIVE = (JobStatus.queued, JobStatus.running)


def validate(spec, session: Session, home: Path, *, model_given: bool = True):
    """The spec, checked and completed, for any job kind."""
    if spec.kind == "finetune":
        return validate_finetune(spec, session)
    if spec.kind == "generate":
        return validate_generate(spec, session, home, model_given=model_given)
    spec = check_metric_options(spec)
    validate_score(spec, session)
    return spec


def pending_finetune(session: Session, adapter_name: str) -> Job | None:
    """A queued or running fine-tune job that will produce `adapter_name`."""
    for job in session.scalars(select(Job).where(Job.kind == JobKind.finetune, Job.status.in_(ACTIVE))):
        if job.spec.get("name") == adapter_name:
            return job
    return None


def validate_finetune(spec: FinetuneSpec, session: Session) -> FinetuneSpec:
    """Returns the spec with its model kind filled in."""
    if spec.search is not None:
        raise InputError("search: set by ASHA and TPE sweeps for their points (a sweep file's strategy: block), not "
                         "by a job of its own")
    check_model(spec.model)
    spec = resolve_model_kind(spec)
    _check_quantizable(spec)
    _check_data(spec, spec.target_column, [spec.train_split] + ([spec.eval_split] if spec.eval_split else []))
    if not spec.replace and session.scalar(select(Adapter.id).where(Adapter.name == spec.name)) is not None:
        raise InputError(f"adapter name {spec.name!r} is already taken; choose another --name, or pass --replace "
                         "to replace that adapter when this job succeeds")
    if pending_finetune(session, spec.name) is not None:
        raise InputError(f"adapter name {spec.name!r} is already used by a queued or running fine-tune job")
    return spec


def _check_quantizable(spec: FinetuneSpec) -> None:
    """A base that bitsandbytes is asked to load in 4-bit (qlora) or 8-bit (--load-in-8bit) must not be saved
    quantized otherwise already (GPTQ, AWQ, ... or bitsandbytes at the other width): transformers would keep the saved
    quantization and the job would not train what it says. (`load_in_8bit` with a method other than lora is refused
    by the spec itself; what the worker's device cannot do fails there at once.)"""
    wanted = "4bit" if spec.method == "qlora" else "8bit" if spec.load_in_8bit else None
    if wanted is None or spec.model in BUILTIN_MODELS:
        return
    saved = (read_config(spec.model) or {}).get("quantization_config")
    if not isinstance(saved, dict):
        return
    method = saved.get("quant_method", "bitsandbytes")
    if method == "bitsandbytes":
        four_bit = saved.get("load_in_4bit") or saved.get("_load_in_4bit")
        if (wanted == "4bit") == bool(four_bit):
            return
        method = f"bitsandbytes {'4' if four_bit else '8'}-bit"
    flag = "--method qlora" if wanted == "4bit" else "--load-in-8bit"
    raise InputError(f"model {spec.model!r} is saved already quantized ({method}); {flag} loads a full-precision "
                     f"base with bitsandbytes {wanted.replace('bit', '-bit')}: use the unquantized model, or --method "
                     "lora without --load-in-8bit")


def validate_generate(spec: GenerateSpec, session: Session, home: Path, *, model_given: bool = True) -> GenerateSpec:
    """Returns the spec with the adapters' base model and model kind filled in."""
    if spec.adapter and spec.adapters:
        raise InputError("give either --adapter or --adapters, not both")
    names = list(spec.adapters) or ([spec.adapter] if spec.adapter else [])
    if len(set(names)) != len(names):
        raise InputError("--adapters names an adapter twice")
    # 'base' in an --adapters list adds the base model's own rows, side by side with the adapters'
    found = {name: _existing_adapter(session, home, name) for name in names if not (spec.adapters and name == "base")}
    if spec.adapters and not found:
        raise InputError("--adapters needs at least one adapter besides 'base'")
    if found:
        bases = {a.base_model for a in found.values()}
        if len(bases) > 1:
            raise InputError(f"adapters of one generate job must share a base model; got {', '.join(sorted(bases))}")
        base_model = bases.pop()
        if model_given and spec.model != base_model:
            trained = f"adapter {spec.adapter!r} was" if spec.adapter else "the adapters were"
            raise InputError(f"{trained} trained on {base_model!r}, not {spec.model!r}")
        first = next(iter(found.values()))
        spec = spec.model_copy(update={"model": base_model, "model_kind": spec.model_kind or first.model_kind})
    check_model(spec.model)
    spec = resolve_model_kind(spec)
    _check_data(spec, None, [spec.split])
    return spec


def _check_data(spec, target: str | None, splits: list[str]) -> None:
    """The dataset exists, has `splits` and the columns the job reads (its target column when it trains), and every
    row of a local dataset holds what the worker will read from it (worker/data/examples.py: a fine-tune's text and
    target in every row; a generate job's text, its optional reference and ids it can store)."""
    columns = required_columns(spec.data_format, spec.text_column, target)
    check_dataset(spec.dataset, columns, splits, dataset_config=spec.dataset_config, data_format=spec.data_format,
                  rules=rules_for(spec, spec.target_column))


def _existing_adapter(session: Session, home: Path, name: str) -> Adapter:
    adapter = session.scalar(select(Adapter).where(Adapter.name == name))
    if adapter is None:
        raise NotFound(f"adapter {name!r} does not exist (see 'adapters list')")
    from worker.store import LocalStore, store_for

    store = store_for(home)
    if isinstance(store, LocalStore):
        folder = store.path(adapter.path)
        found = (folder / "adapter_config.json").exists() or (folder / "config.json").exists()
    else:  # a complete upload: its manifest is written last
        found = store.exists(adapter.path)
    if not found:
        raise InputError(f"adapter {name!r} is recorded but its folder {store.describe(adapter.path)} is missing")
    return adapter


def validate_score(spec: ScoreSpec, session: Session) -> Job:
    """Returns the generate job to score; it must be a succeeded generate job whose kind fits the metric."""
    job = session.get(Job, spec.generate_job_id)
    if job is None:
        raise NotFound(f"job {spec.generate_job_id} does not exist")
    if job.kind != JobKind.generate:
        raise InputError(f"job {job.id} is a {job.kind.value} job; score takes a generate job")
    if job.status != JobStatus.succeeded:
        raise InputError(f"generate job {job.id} is {job.status.value}; only a succeeded generate job can be scored")
    model_kind = parse_spec(job.spec).model_kind or (job.result or {}).get("model_kind") or "seq2seq"
    metric_families(spec.metrics, model_kind, job.id)
    check_metric_options(spec)
    return job


def check_code_metrics(allowed: bool, metrics: list[str] | None) -> None:
    """An `evaluate:` metric runs its script's code on the workers: refused where the door does not allow it."""
    if not allowed and any(is_evaluate(m) for m in metrics or []):
        raise InputError("metrics: evaluate: metrics run their script as code on the workers; this server takes them "
                         "only with TUNEQUEUE_API_EVALUATE=1 (the CLI always does)")


def check_metric_options(spec: ScoreSpec) -> ScoreSpec:
    """What a score spec's metrics need beyond its own fields, checked where it is enqueued: a local `evaluate:`
    metric exists (returned as an absolute path), and BERTScore rescaling has a baseline for the model."""
    metrics = [_evaluate_target(m) if is_evaluate(m) else m for m in spec.metrics or []]
    modules = [evaluate_module(m[len(EVALUATE_PREFIX):]) for m in metrics if is_evaluate(m)]
    if len(modules) != len(set(modules)):  # their rows are named after the module: one would replace the other
        raise InputError(f"--metric: two evaluate: metrics of one module name ({', '.join(modules)}) in one job")
    if spec.bertscore_rescale and "bertscore" in metrics:
        model = spec.bertscore_model or DEFAULT_BERTSCORE_MODEL
        if baseline_file(model) is None:
            raise InputError(f"--bertscore-rescale: bert-score has no English baseline for {model!r}; use e.g. "
                             "--bertscore-model roberta-large, or leave rescaling off")
    return spec.model_copy(update={"metrics": metrics}) if spec.metrics else spec


def _evaluate_target(metric: str) -> str:
    """An `evaluate:` metric with a local script or folder made absolute (InputError when it names one that does
    not exist); a hub name (`exact_match`, `user/metric`) as given."""
    target = metric[len(EVALUATE_PREFIX):]
    try:
        path = Path(target).expanduser()
        if not (target.startswith((".", "/", "~")) or target.endswith(".py") or path.exists()):
            return metric
        found = path.exists()
    except (OSError, RuntimeError, ValueError):  # ~nosuchuser, a name too long, a NUL byte
        found = False
    if not found:
        raise InputError(f"--metric {metric[:200]}: no such metric script or folder")
    return EVALUATE_PREFIX + str(path.absolute())
