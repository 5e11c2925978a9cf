"""Starting an ASHA or TPE sweep: its Optuna study and first trials, created before the sweep's rows are stored.

The study lives in tunequeue's own database (Optuna's RDB storage, models/search.py). ASHA records each grid or
random point as a trial with its fixed params (and its bracket); TPE asks its sampler for the first `parallel`
trials, and the workers ask for the rest as trials end (worker/search.py). Optuna writes on its own connection, so
this runs before tunequeue's transaction opens (a SQLite file has one writer at a time); a sweep whose rows then
fail to commit takes its study with it (`drop_study`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import replace

from api.sweeps import SweepPlan, param_value
from models.search import AshaStrategy, TpeStrategy, optuna_storage, study_name
from worker.search import ask_trial, point_spec


def start_search(database_url: str, plan: SweepPlan) -> SweepPlan:
    """For an ASHA or TPE plan: the study created and the plan's points replaced by its first trials, each
    fine-tune carrying its search (study, trial, rungs); the plan's spec records the study and, for TPE, the
    distributions the workers sample from. Grid and random plans come back as they are."""
    import optuna

    strategy = plan.strategy
    if not isinstance(strategy, (AshaStrategy, TpeStrategy)):
        return plan
    name = f"{study_name(plan.name)}-{uuid.uuid4().hex[:8]}"
    storage = optuna_storage(database_url)
    study = optuna.create_study(study_name=name, storage=storage,
                                direction="minimize" if strategy.direction == "min" else "maximize")
    study.set_user_attr("sweep", plan.name)
    study.set_user_attr("strategy", strategy.model_dump(mode="json"))
    try:
        if isinstance(strategy, AshaStrategy):
            points = [_asha_point(study, plan, strategy, point, name) for point in plan.points]
        else:
            template = plan.points[0].finetune.model_dump(mode="json")
            points = []
            for index in range(min(strategy.parallel, strategy.n)):
                number, params = ask_trial(database_url, strategy, name, plan.distributions, index)
                spec = point_spec(template, params, plan.name, number, strategy, name)
                points.append(replace(plan.points[0], index=number + 1, varied=params, finetune=spec,
                                      generate=plan.points[0].generate.model_copy(update={"adapter": spec.name})))
    except Exception:
        drop_study(database_url, name)
        raise
    recorded = {**plan.spec.get("strategy", {}), "study": name}
    if plan.distributions is not None:
        recorded["distributions"] = plan.distributions
    return replace(plan, points=points, spec={**plan.spec, "strategy": recorded})


def _asha_point(study, plan: SweepPlan, strategy: AshaStrategy, point, name: str):
    """The point as an Optuna trial with its own values as fixed params, in bracket (index - 1) mod brackets."""
    from optuna.distributions import json_to_distribution

    params = {key: param_value(value) for key, value in point.varied.items()}
    study.enqueue_trial(params, skip_if_exists=False)
    trial = study.ask({key: json_to_distribution(json.dumps(d)) for key, d in plan.distributions.items()})
    bracket = (point.index - 1) % strategy.brackets
    trial.set_user_attr("bracket", bracket)
    trial.set_user_attr("adapter", point.finetune.name)
    spec = point_spec(point.finetune.model_dump(mode="json"), {}, plan.name, trial.number, strategy, name,
                      rungs=strategy.rungs(bracket), bracket=bracket)
    return replace(point, finetune=spec.model_copy(update={"name": point.finetune.name}))


def drop_study(database_url: str, name: str) -> None:
    """Remove a sweep's study (a failed submission, or `sweeps delete`); nothing when there is none."""
    import optuna

    try:
        optuna.delete_study(study_name=name, storage=optuna_storage(database_url))
    except KeyError:
        pass
