"""Co-training (worker/jobs/cotrain.py, worker/ml/co_lora.py): sweep points trained together in one pass over the
resident base follow the runs they would have been alone, are saved as PEFT would save them, and specs that cannot
share a pass are refused with the reason."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from models import make_session_factory
from models.jobs import JobKind
from models.results import Adapter, LossPoint
from models.specs import FinetuneSpec
from tests.conftest import new_job, sqlite_home
from worker.jobs.cotrain import compatible, train_adapters_together
from worker.jobs.finetune import train_adapter
from worker.ml.model_cache import ModelCache

# short runs: 30 steps at batch 8 on 240 examples, evaluated at step 30 on 40
SHARED = dict(target_modules=["q", "v"], lora_alpha=32, per_device_train_batch_size=8, max_steps=30,
              train_limit=240, eval_limit=40, eval_steps=15)
# two points that differ in every hyperparameter a co-trained point may have of its own, ranks 8 and 16 among them
POINTS = {"a": dict(learning_rate=3e-3, lora_r=8), "b": dict(learning_rate=1e-3, lora_r=16, lora_alpha=16,
                                                             warmup_steps=5, max_grad_norm=0.5)}


def spec(name: str, **changes) -> FinetuneSpec:
    return FinetuneSpec(**{**SHARED, "name": name, **changes})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, builtin_home):
    """Points a and b each trained alone (train_adapter), then both together (train_adapters_together)."""
    home, url = sqlite_home(tmp_path_factory, builtin_home, "cotrain-home")
    session = make_session_factory(url)()
    cache = ModelCache(home)
    cache.get("tiny-t5")  # resident before the first seeded run, as in a worker: its load draws no random numbers
    alone, jobs = {}, {}
    for key, point in POINTS.items():
        s = spec(f"alone-{key}", **point)
        jobs[f"alone-{key}"] = new_job(session, JobKind.finetune, s).id
        alone[key] = train_adapter(s, session, cache, home, job_id=jobs[f"alone-{key}"])
    together_specs = [spec(f"co-{key}", **point) for key, point in POINTS.items()]
    for s in together_specs:
        jobs[s.name] = new_job(session, JobKind.finetune, s).id
    together = train_adapters_together(together_specs, session, cache, home,
                                       job_ids=[jobs[s.name] for s in together_specs])
    yield {"home": home, "session": session, "cache": cache, "alone": alone, "together": dict(zip(POINTS, together)),
           "jobs": jobs}
    session.close()


def curve(session, job_id: int) -> list[tuple]:
    return [(p.step, p.train_loss, p.eval_loss)
            for p in session.scalars(select(LossPoint).where(LossPoint.job_id == job_id).order_by(LossPoint.step))]


def weights(home, name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(home / "adapters" / name / "adapter_model.safetensors"))


# Tolerances: the pass computes what the runs alone compute, in another order only where a rank is padded (rank 8
# beside rank 16 sums eight extra zeros in the LoRA product); rank 16's weights came out bit-identical to its run
# alone. Measured over these 30 steps: losses within 2e-7 relative, weights within 5e-5 of their largest entry (Adam
# divides each update by the gradient's RMS, which lifts a rounding difference in a near-zero gradient to a full
# update). The bounds are 20-50x that, and far below what a mistake does: clipping both adapters' gradients together
# instead of each alone fails these tests (checked), and the loss falls by ~1% a step, so a wrong learning rate,
# scale or warm-up shows at once.
LOSS_RTOL = 1e-5
WEIGHT_RTOL = 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("key", list(POINTS))
def test_each_point_follows_its_run_alone(runs, key):
    session, home = runs["session"], runs["home"]
    alone, together = curve(session, runs["jobs"][f"alone-{key}"]), curve(session, runs["jobs"][f"co-{key}"])
    assert [p[0] for p in alone] == [p[0] for p in together] == [10, 15, 20, 30]
    for (step, train_a, eval_a), (_, train_t, eval_t) in zip(alone, together):
        assert (train_t is None) == (train_a is None) and (eval_t is None) == (eval_a is None), step
        if train_a is not None:
            assert train_t == pytest.approx(train_a, rel=LOSS_RTOL), step
        if eval_a is not None:
            assert eval_t == pytest.approx(eval_a, rel=LOSS_RTOL), step
    assert alone[-1][1] < alone[0][1] * 0.9  # it learned something, so following it means something
    solo, co = weights(home, f"alone-{key}"), weights(home, f"co-{key}")
    assert set(solo) == set(co)
    for name, tensor in solo.items():
        assert co[name].shape == tensor.shape and co[name].dtype == tensor.dtype, name
        scale = float(tensor.abs().max()) or 1.0
        assert float((co[name] - tensor).abs().max()) <= WEIGHT_RTOL * scale, name


@pytest.mark.slow
def test_summaries_and_rows_match_a_run_alone(runs):
    session = runs["session"]
    for key in POINTS:
        alone, together = runs["alone"][key], runs["together"][key]
        assert together["co_trained_with"] == [f"co-{k}" for k in POINTS if k != key]
        assert set(alone) <= set(together)
        for field in ("steps", "total_steps", "trainable_params", "total_params", "initial_eval_loss", "method"):
            assert together[field] == alone[field], field
        assert together["eval_loss"] == pytest.approx(alone["eval_loss"], rel=LOSS_RTOL)
        row = session.scalar(select(Adapter).where(Adapter.name == f"co-{key}"))
        solo_row = session.scalar(select(Adapter).where(Adapter.name == f"alone-{key}"))
        assert row.job_id == runs["jobs"][f"co-{key}"] and row.path == f"adapters/co-{key}"
        assert row.hyperparameters == {**solo_row.hyperparameters}
        assert row.size_bytes == solo_row.size_bytes


@pytest.mark.slow
def test_folders_are_what_peft_writes_and_load_with_peft(runs):
    """The config is the one PEFT writes for the same point, byte for byte; PeftModel loads the folder and gives the
    hooks' outputs (ranks 8 and 16 in one pass)."""
    import torch
    from peft import PeftModel

    from worker.ml.co_lora import CoLora
    from worker.ml.methods import peft_config

    home, cache = runs["home"], runs["cache"]
    for key in POINTS:
        co, alone = home / "adapters" / f"co-{key}", home / "adapters" / f"alone-{key}"
        assert sorted(p.name for p in co.iterdir()) == sorted(p.name for p in alone.iterdir()) == [
            "README.md", "adapter_config.json", "adapter_model.safetensors"]
        for name in ("README.md", "adapter_config.json"):
            assert (co / name).read_text() == (alone / name).read_text(), name
    loaded = cache.get("tiny-t5")
    specs = [spec(f"co-{key}", **point) for key, point in POINTS.items()]
    co = CoLora(loaded.model, [peft_config(s, "seq2seq", loaded) for s in specs])
    for i, s in enumerate(specs):
        co.load_state_dict(i, weights(home, s.name))
    tokenizer = loaded.tokenizer
    inputs = tokenizer(["#Person1#: Where is the meeting? #Person2#: In Paris, at noon.", "Hi there."],
                       return_tensors="pt", padding=True)
    labels = tokenizer(["They meet in Paris.", "A greeting."], return_tensors="pt", padding=True).input_ids
    try:
        with torch.no_grad(), co.rows(range(len(specs))):
            hooked = loaded.model(input_ids=inputs.input_ids.repeat(2, 1),
                                  attention_mask=inputs.attention_mask.repeat(2, 1), labels=labels.repeat(2, 1)).logits
        with torch.no_grad():
            plain = loaded.model(**inputs, labels=labels).logits
    finally:
        co.remove()
    import copy

    for i, s in enumerate(specs):
        peft_model = PeftModel.from_pretrained(copy.deepcopy(loaded.model), str(home / "adapters" / s.name))
        with torch.no_grad():
            expected = peft_model(**inputs, labels=labels).logits
        assert torch.allclose(hooked[2 * i:2 * i + 2], expected, atol=1e-4), s.name
        assert not torch.allclose(expected, plain, atol=1e-2)  # the adapter changes the output
    assert not any("lora" in name for name, _ in loaded.model.named_modules())  # no PEFT layer was left behind


def test_compatible_accepts_points_that_differ_in_their_own_hyperparameters():
    assert compatible([spec("a", **POINTS["a"]), spec("b", **POINTS["b"]), spec("c", lora_dropout=0.1)]) is None


@pytest.mark.parametrize("change, expected", [
    ({"seed": 7}, "differ in seed (42 vs 7)"),
    ({"per_device_train_batch_size": 16}, "differ in per_device_train_batch_size (8 vs 16)"),
    ({"target_modules": ["q", "k", "v"]}, "differ in target_modules"),
    ({"dataset": "synthetic-sentiment"}, "differ in dataset"),
    ({"max_steps": 40}, "differ in max_steps (30 vs 40)"),
    ({"method": "qlora"}, "b cannot be co-trained: method qlora"),
    ({"optim": "adamw_8bit"}, "b cannot be co-trained: optim adamw_8bit"),
    ({"early_stopping_patience": 2}, "b cannot be co-trained: early stopping"),
    ({"name": "a"}, "share an adapter name (a)"),
])
def test_compatible_refuses_with_the_reason(change, expected):
    reason = compatible([spec("a"), spec(**{"name": "b", **change})])
    assert reason is not None and expected in reason, reason
    assert "\n" not in reason


def test_train_adapters_together_refuses_incompatible_specs(tmp_path):
    with pytest.raises(ValueError, match="differ in seed"):
        train_adapters_together([spec("a"), spec("b", seed=1)], None, None, tmp_path)


@pytest.mark.slow
def test_a_point_that_cancels_leaves_the_pass_and_the_others_train_on(runs):
    session, cache, home = runs["session"], runs["cache"], runs["home"]
    specs = [spec("stay", max_steps=20), spec("go", max_steps=20, learning_rate=1e-3)]
    jobs = [new_job(session, JobKind.finetune, s).id for s in specs]
    seen = []

    def cancel_at_10(progress):
        seen.append(progress["step"])
        return progress["step"] >= 10

    stay, go = train_adapters_together(specs, session, cache, home, job_ids=jobs,
                                       on_progress=[None, cancel_at_10])
    assert go == {"adapter": "go", "cancelled": "cancelled at step 10"} and seen == [10]
    assert stay["steps"] == 20 and stay["co_trained_with"] == ["go"]
    assert session.scalar(select(Adapter).where(Adapter.name == "go")) is None
    assert not (home / "adapters" / "go").exists()
    assert [p[0] for p in curve(session, jobs[0])] == [10, 15, 20]


@pytest.mark.slow
def test_a_point_stopped_mid_pass_resumes_alone_from_its_checkpoint(runs):
    """Each point of a pass writes its job's checkpoint as a run alone would: both points stopped at step 20 (after
    their checkpoint at 15), each resumed alone by `train_adapter` ends where its uninterrupted run alone ended."""
    session, cache, home = runs["session"], runs["cache"], runs["home"]
    specs = [spec(f"ck-{key}", checkpoint_every_steps=15, **point) for key, point in POINTS.items()]
    jobs = [new_job(session, JobKind.finetune, s) for s in specs]
    stop_at_20 = lambda progress: progress["step"] >= 20  # noqa: E731 - the pass's points leave there
    stopped = train_adapters_together(specs, session, cache, home, job_ids=[j.id for j in jobs],
                                      on_progress=[stop_at_20, stop_at_20])
    assert all("cancelled" in result for result in stopped)
    for job in jobs:
        assert (home / "checkpoints" / job.uid / "checkpoint.pt").exists()
    for key, s, job in zip(POINTS, specs, jobs):
        resumed = train_adapter(s, session, cache, home, job_id=job.id)
        assert resumed["resumed_from_step"] == 15 and resumed["steps"] == 30
        assert resumed["eval_loss"] == pytest.approx(runs["alone"][key]["eval_loss"], rel=LOSS_RTOL)
        alone = curve(session, runs["jobs"][f"alone-{key}"])
        assert [p[0] for p in curve(session, job.id)] == [p[0] for p in alone]
        for (step, *losses_alone), (_, *losses_resumed) in zip(alone, curve(session, job.id)):
            for loss_a, loss_r in zip(losses_alone, losses_resumed):
                assert loss_r == (pytest.approx(loss_a, rel=LOSS_RTOL) if loss_a is not None else None), step
        solo, back = weights(home, f"alone-{key}"), weights(home, f"ck-{key}")
        for name, tensor in solo.items():
            scale = float(tensor.abs().max()) or 1.0
            assert float((back[name] - tensor).abs().max()) <= WEIGHT_RTOL * scale, name


def test_hook_forms_agree_and_start_as_peft_starts(builtin_home):
    """The batched-matmul and per-block forms give the same outputs and gradients, with ranks and dropouts that
    differ; and an adapter starts where get_peft_model starts it after the same seed."""
    import copy

    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    from worker.ml.co_lora import CoLora

    base = AutoModelForSeq2SeqLM.from_pretrained(builtin_home / "builtin" / "tiny-t5")
    configs = [LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=r, lora_alpha=32, target_modules=["q", "v"],
                          use_rslora=rs) for r, rs in ((8, False), (16, True), (4, False))]
    torch.manual_seed(3)
    reference = get_peft_model(copy.deepcopy(base), copy.deepcopy(configs[1]))
    expected = {k.replace(".default", ""): v for k, v in reference.state_dict().items() if "lora_" in k}
    x = torch.randint(3, 800, (2, 12))
    labels = torch.randint(3, 800, (2, 5))
    outputs = {}
    for mode in ("bmm", "loop"):
        co = CoLora(base, configs, seed=3, mode=mode)
        if mode == "bmm":
            assert {k: torch.equal(v, expected[k]) for k, v in co.state_dict(1).items()} == dict.fromkeys(expected,
                                                                                                           True)
        torch.manual_seed(0)
        with torch.no_grad():
            for i in range(3):
                for layer in co.layers:
                    co.b[i][layer].normal_(0, 0.05)
        with co.rows([2, 0, 1]):
            loss = base(input_ids=x.repeat(3, 1), labels=labels.repeat(3, 1)).loss
        loss.backward()
        outputs[mode] = (loss.detach(), [p.grad.clone() for i in range(3) for p in co.parameters(i)])
        assert all(p.grad is None for p in base.parameters())  # a fresh base requires grad: frozen while hooked
        co.remove()
        assert all(p.requires_grad for p in base.parameters())  # and left as it was
    assert torch.allclose(outputs["bmm"][0], outputs["loop"][0], rtol=1e-5)
    for g_bmm, g_loop in zip(outputs["bmm"][1], outputs["loop"][1]):
        assert torch.allclose(g_bmm, g_loop, rtol=1e-4, atol=1e-6)
    base.train()
    co = CoLora(base, [copy.deepcopy(c) for c in configs], seed=3)
    co.configs[0].lora_dropout = co.dropouts[0] = 0.5  # blocks with different dropout rates in one pass
    with co.rows([0, 1]):
        loss = base(input_ids=x.repeat(2, 1), labels=labels.repeat(2, 1)).loss
    loss.backward()
    assert all(p.grad is not None for p in co.parameters(0) + co.parameters(1))
    assert all(p.grad is None for p in co.parameters(2))  # not in the pass
    co.remove()
    base.eval()


@pytest.mark.slow
def test_bench_cotrain_small():
    """bench/cotrain.py's smoke run: both sides' figures, the two paired ratios, and the same quality on both sides
    (the figures are measurements, not asserted as timings)."""
    from tests.test_bench import run_bench

    lines = run_bench("bench/cotrain.py", "--tiny", "--steps", "3")
    figures = {line["figure"]: line for line in lines if "figure" in line}
    assert figures["one_by_one"]["points"] == figures["together"]["points"] == 2
    assert figures["one_by_one"]["steps_per_point"] == figures["together"]["steps_per_point"] == 3
    ratios = [line for line in lines if "ratio" in line]
    assert len(ratios) == 2 and abs(ratios[0]["eval_loss_mean_difference"]) < 1e-4


# ------------------------------------------------------------------------------------ in a worker (TUNEQUEUE_COTRAIN)
@pytest.mark.slow
def test_a_worker_co_trains_a_sweeps_points(pg_env, tmp_path):
    """TUNEQUEUE_COTRAIN=3 and a 4-point LoRA sweep: the worker's first fine-tune takes two queued siblings into its
    pass (each an attempt of its own job, succeeded, with its adapter, loss curve and `co_trained_in_job`), the fourth
    runs alone (the limit), the siblings' own Celery tasks end SUCCESS saying where they were trained, and the sweep's
    evaluation covers all four. A bad TUNEQUEUE_COTRAIN is one line naming the variable."""
    import json

    import yaml

    from models.jobs import Job, JobStatus
    from models.settings import Settings
    from tests.conftest import cli, session_of, start_worker
    from worker.celery_app import make_app

    env = {**pg_env, "TUNEQUEUE_COTRAIN": "3"}
    data = {"name": "co", "base": {"model": "tiny-t5", "train_limit": 64, "eval_limit": 8, "max_steps": 6,
                                   "per_device_train_batch_size": 8, "target_modules": ["q", "v"]},
            "grid": {"learning_rate": [1e-3, 3e-3], "lora_r": [4, 8]},
            "eval": {"split": "test", "limit": 4, "max_new_tokens": 8}}
    path = tmp_path / "co.yaml"
    path.write_text(yaml.safe_dump(data))
    queued = cli(env, "sweep", str(path))
    assert queued.returncode == 0, queued.stderr
    log = tmp_path / "worker.log"
    worker = start_worker(env, "--burst", log=log)
    assert worker.wait(timeout=400) == 0, log.read_text()[-3000:]

    with session_of(env) as session:
        jobs = list(session.scalars(select(Job).order_by(Job.id)))
        adapters = {a.name: a for a in session.scalars(select(Adapter))}
        curves = {job.id: session.scalar(select(LossPoint.step).where(LossPoint.job_id == job.id)
                                         .order_by(LossPoint.step.desc()).limit(1)) for job in jobs}
    finetunes = [job for job in jobs if job.kind == JobKind.finetune]
    assert [job.status for job in jobs] == [JobStatus.succeeded] * 6, [(j.id, j.status, j.error) for j in jobs]
    lead, first, second, alone = finetunes
    assert sorted(lead.result["co_trained_with"]) == sorted([first.spec["name"], second.spec["name"]])
    for sibling in (first, second):
        assert sibling.result["co_trained_in_job"] == lead.id and sibling.attempts == 1
        assert lead.spec["name"] in sibling.result["co_trained_with"] and sibling.result["steps"] == 6
        state = make_app(Settings.from_env(env)).AsyncResult(sibling.celery_task_id)
        assert state.state == "SUCCESS" and f"co-trained in job {lead.id}'s pass" in str(state.result)
    assert "co_trained_with" not in alone.result and "co_trained_in_job" not in alone.result
    assert {job.spec["name"] for job in finetunes} <= set(adapters) and all(curves[job.id] == 6 for job in finetunes)
    evaluation = next(job for job in jobs if job.kind == JobKind.generate)
    assert sorted(evaluation.spec["adapters"]) == sorted(["base"] + [job.spec["name"] for job in finetunes])
    shown = json.loads(cli(env, "jobs", "show", str(first.id), "--json").stdout)
    assert shown["result"]["co_trained_in_job"] == lead.id

    bad = cli({**pg_env, "TUNEQUEUE_COTRAIN": "many"}, "jobs", "list")
    assert bad.returncode != 0 and "TUNEQUEUE_COTRAIN" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_killed_co_trained_pass_resumes_each_point_from_its_checkpoint(make_env, tmp_path):
    """kill -9 of a worker in the middle of a co-trained pass, once each point has checkpointed: the next worker finds
    the three jobs lost, and each resumes alone from its own checkpoint (nothing trained is lost) to the same end."""
    import signal
    from pathlib import Path

    import yaml

    from models.jobs import Job, JobStatus
    from tests.conftest import cli, session_of, start_worker, wait_until
    from tests.test_faults import FAST_REAPER, stop

    env = {**make_env("postgresql"), **FAST_REAPER, "TUNEQUEUE_COTRAIN": "3"}
    data = {"name": "co-kill", "base": {"model": "tiny-t5", "train_limit": 64, "eval_limit": 8, "max_steps": 240,
                                        "per_device_train_batch_size": 8, "target_modules": ["q", "v"],
                                        "checkpoint_every_steps": 20},
            "grid": {"learning_rate": [1e-3, 2e-3, 3e-3]}, "eval": {"split": "test", "limit": 4, "max_new_tokens": 8}}
    path = tmp_path / "co.yaml"
    path.write_text(yaml.safe_dump(data))
    queued = cli(env, "sweep", str(path))
    assert queued.returncode == 0, queued.stderr
    with session_of(env) as session:
        uids = [job.uid for job in session.scalars(select(Job).where(Job.kind == JobKind.finetune).order_by(Job.id))]
    files = [Path(env["TUNEQUEUE_HOME"]) / "checkpoints" / uid / "checkpoint.pt" for uid in uids]
    first = start_worker(env, log=tmp_path / "first.log")
    try:
        wait_until(lambda: all(f.exists() for f in files), 180, "each point's checkpoint")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        stop(first)
    with session_of(env) as session:
        jobs = list(session.scalars(select(Job).where(Job.kind == JobKind.finetune)))
        assert all(job.status == JobStatus.running and job.attempts == 1 for job in jobs), [
            (job.id, job.status) for job in jobs]
    second = start_worker(env, log=tmp_path / "second.log")
    try:
        def ended():
            with session_of(env) as session:
                jobs = list(session.scalars(select(Job).where(Job.kind == JobKind.finetune).order_by(Job.id)))
            return all(job.status.finished for job in jobs) and jobs
        jobs = wait_until(ended, 300, "the three points")
    finally:
        stop(second)
    logs = (tmp_path / "second.log").read_text()[-3000:]
    for job in jobs:
        assert job.status == JobStatus.succeeded and job.attempts == 2, (job.id, job.error, logs)
        assert job.attempt_errors[0]["error"].startswith("worker lost: no heartbeat")
        assert job.result["resumed_from_step"] >= 20 and job.result["steps"] == 240
        assert "co_trained_in_job" not in job.result  # a retry trains alone
    assert not any(f.exists() for f in files)
    with session_of(env) as session:
        for job in jobs:
            steps = session.scalars(select(LossPoint.step).where(LossPoint.job_id == job.id)).all()
            assert len(steps) == len(set(steps)) and max(steps) == 240


def test_a_pass_leaves_idle_workers_their_share():
    """The lead takes ⌈points / (1 + idle workers on its queue)⌉ of the queued compatible points (itself included),
    counting only other live workers that consume the queue and run nothing."""
    from types import SimpleNamespace

    from worker.cotrain_run import fair_share, idle_peers

    assert [fair_share(8, n) for n in (0, 1, 2, 3, 7, 20)] == [8, 4, 3, 2, 1, 1]
    assert fair_share(4, 2) == 2 and fair_share(1, 0) == 1

    records = [{"hostname": "me@a", "current_job": 1, "queues": ["tq"]},
               {"hostname": "idle@b", "current_job": None, "queues": ["tq", "tq.base.x"]},
               {"hostname": "busy@c", "current_job": 7, "queues": ["tq"]},
               {"hostname": "elsewhere@d", "current_job": None, "queues": ["other"]},
               {"hostname": "idle@e", "current_job": None, "queues": ["tq"]}]

    class Registry:
        def live_workers(self):
            return records

    class Down:
        def live_workers(self):
            raise ConnectionError("redis away")

    runtime = SimpleNamespace(broker=Registry(), record=SimpleNamespace(hostname="me@a"))
    assert idle_peers(runtime, "tq") == 2 and idle_peers(runtime, "tq.base.x") == 1 and idle_peers(runtime, None) == 0
    assert idle_peers(SimpleNamespace(broker=Down(), record=None), "tq") == 0
