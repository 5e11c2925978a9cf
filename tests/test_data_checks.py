"""Issue 13, parts 9 and 10: input the worker would refuse for certain never reaches the queue (every row of a local
file is checked before enqueue, naming its line or row), what can only be told on the worker fails there at once as
a data error, and valid JSON Lines with Unicode line separators inside strings are read as JSON Lines define them."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from sqlalchemy import func, select

from models.errors import InputError
from models.specs import FinetuneSpec, GenerateSpec
from tests.conftest import check_rejected, enqueued_spec
from worker.data.examples import examples_for
from worker.data.refs import check_dataset

# every separator str.splitlines() splits on besides "\n" and "\r"
SEPARATORS = "\u2028\u2029\u0085\x1c\x1d\x1e\x0b\x0c"


def chats(n: int, **overrides) -> list[dict]:
    rows = [{"dialogue": f"A: hello {i}\nB: bye {i}", "summary": f"A greets B ({i})."} for i in range(n)]
    for index, fields in overrides.items():
        rows[int(index)].update(fields)
    return rows


def jsonl(path, rows, newline="\n"):
    path.write_bytes((newline.join(json.dumps(r, ensure_ascii=False) for r in rows) + newline).encode())
    return path


NAMES = iter(range(10**6))


def finetune(path, *extra):
    return ["finetune", "--name", f"a{next(NAMES)}", "--dataset", str(path), *extra]


def generate(path, *extra):
    return ["generate", "--dataset", str(path), *extra]


# ------------------------------------------------------------------------------- 9. bad rows, not just the first
def test_null_target_far_down_a_jsonl_file_is_refused_naming_its_line(sqlite_env, tmp_path):
    path = jsonl(tmp_path / "chats.jsonl", chats(60, **{"46": {"summary": None}}))
    check_rejected(sqlite_env, finetune(path), f"dataset file {path}: line 47: column 'summary' is null")
    # the worker reading that split refuses the row in the same words (a data error: failed at once, no retry)
    spec = FinetuneSpec(name="a", dataset=str(path))
    with pytest.raises(InputError, match="line 47: column 'summary' is null"):
        for split in ("train", "validation", "test"):
            examples_for(spec, split, target_column="summary")


@pytest.mark.parametrize("row, expected", [
    ({"dialogue": None}, "line 31: column 'dialogue' is null"),
    ({"dialogue": ["A: hi", "B: bye"]}, "line 31: column 'dialogue' holds a list"),
    ({"summary": {"text": "A greets B."}}, "line 31: column 'summary' holds an object"),
    ({"summary": [1]}, "line 31: column 'summary' holds a list"),
])
def test_null_and_non_scalar_text_or_target_refused(sqlite_env, tmp_path, row, expected):
    path = jsonl(tmp_path / "chats.jsonl", chats(40, **{"30": row}))
    check_rejected(sqlite_env, finetune(path), expected)


def test_a_row_missing_the_text_column_is_refused(sqlite_env, tmp_path):
    rows = chats(40)
    del rows[25]["dialogue"]
    path = jsonl(tmp_path / "chats.jsonl", rows)
    check_rejected(sqlite_env, generate(path), "line 26 has no column 'dialogue' (columns: summary)")


def test_bad_rows_in_every_other_format_are_named_by_record_line_or_row(sqlite_env, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    array = tmp_path / "chats.json"
    array.write_text(json.dumps(chats(30, **{"20": {"dialogue": {"a": "hi"}}})))
    check_rejected(sqlite_env, generate(array), "record 21: column 'dialogue' holds an object")

    csv_file = tmp_path / "chats.csv"  # line 9 has fewer fields than the header: its summary is missing
    csv_file.write_text("dialogue,summary\n" + "".join(f"hi {i},s {i}\n" for i in range(7)) + "only text\n"
                        + "hi,s\n" * 20)
    check_rejected(sqlite_env, finetune(csv_file), "line 9: column 'summary' is null")

    parquet = tmp_path / "chats.parquet"
    pq.write_table(pa.Table.from_pylist(chats(30, **{"17": {"summary": None}})), parquet, row_group_size=4)
    check_rejected(sqlite_env, finetune(parquet), f"dataset file {parquet}: row 18: column 'summary' is null")

    folder = tmp_path / "saved"
    datasets.Dataset.from_list(chats(30, **{"28": {"dialogue": None}})).save_to_disk(str(folder))
    check_rejected(sqlite_env, generate(folder), f"dataset folder {folder}: row 29: column 'dialogue' is null")


def test_numbers_and_booleans_are_text_nulls_are_not_a_generate_reference(sqlite_env, tmp_path):
    """Labels may be ints or booleans (str() of them); a generate job's reference is optional, so a null one is no
    reference, not an error; a fine-tune needs every target."""
    folder = tmp_path / "data"
    folder.mkdir()
    jsonl(folder / "test.jsonl", chats(6, **{"3": {"summary": None}, "4": {"summary": 7.5}}))
    jsonl(folder / "train.jsonl", chats(6, **{"3": {"summary": None}}))
    check_rejected(sqlite_env, finetune(folder, "--eval-split", "test"),
                   "train.jsonl: line 4: column 'summary' is null")
    enqueued_spec(sqlite_env, generate(folder))
    targets = [e["target"] for e in examples_for(GenerateSpec(dataset=str(folder)), "test", target_column="summary")]
    assert targets[3:5] == [None, "7.5"]

    rows = [{"text": f"review {i}", "label": [1, 0, True][i % 3]} for i in range(30)]
    path = jsonl(tmp_path / "labels.jsonl", rows)
    spec = enqueued_spec(sqlite_env, finetune(path, "--model", "tiny-bert", "--text-column", "text"))
    assert (spec["model_kind"], spec["label_column"]) == ("classification", "label")
    examples = examples_for(FinetuneSpec(**spec), "train", target_column="label")
    assert {e["target"] for e in examples} == {"1", "0", "True"}


# ----------------------------------------------------------------------------------------- 9. example ids
def split_folder(tmp_path, rows, split="test"):
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    jsonl(folder / f"{split}.jsonl", rows)
    return folder


def with_ids(ids) -> list[dict]:
    return [{"id": example_id, **row} for example_id, row in zip(ids, chats(len(ids)))]


def test_duplicate_example_ids_refused_for_generate(sqlite_env, tmp_path):
    folder = split_folder(tmp_path, with_ids(["a", "b", "c", "b", "d"]))
    check_rejected(sqlite_env, generate(folder), "line 4: id 'b' is used again (first at line 2)")
    # an integer id and the same id as text are one id in the generations table
    (folder / "test.jsonl").unlink()
    folder = split_folder(tmp_path, with_ids([1, 2, "3", 3]))
    check_rejected(sqlite_env, generate(folder), "line 4: id '3' is used again (first at line 3)")
    # an id column next to rows without one: those rows' positions collide with it
    (folder / "test.jsonl").unlink()
    rows = chats(4) + with_ids(["2"])
    folder = split_folder(tmp_path, rows)
    check_rejected(sqlite_env, generate(folder), "line 5: id '2' is used again (first at line 3)")
    with pytest.raises(InputError, match="line 5: id '2' is used again"):
        examples_for(GenerateSpec(dataset=str(folder)), "test", target_column="summary", limit=2)


def test_over_long_null_and_nul_ids_refused_for_generate(sqlite_env, tmp_path):
    folder = split_folder(tmp_path, with_ids(["ok", "x" * 128, "y" * 129]))
    check_rejected(sqlite_env, generate(folder), f"line 3: id {'y' * 24!r}... is 129 characters long; example ids "
                                                 "may have at most 128")
    (folder / "test.jsonl").unlink()
    split_folder(tmp_path, with_ids(["a", None]))
    check_rejected(sqlite_env, generate(folder), "line 2: column 'id' is null")
    (folder / "test.jsonl").unlink()
    split_folder(tmp_path, with_ids(["a", "b\x00c"]))
    check_rejected(sqlite_env, generate(folder), "line 2: column 'id' holds a NUL character")
    (folder / "test.jsonl").unlink()
    split_folder(tmp_path, chats(3, **{"2": {"dialogue": "A: hi\x00"}}))
    check_rejected(sqlite_env, generate(folder), "line 3: column 'dialogue' holds a NUL character")


def test_ids_a_job_does_not_store_are_not_checked(sqlite_env, tmp_path):
    """A fine-tune stores no example ids; and a carved file's ids are row positions, whatever its id column holds."""
    folder = split_folder(tmp_path, with_ids(["a", "a", "z" * 300]), split="train")
    jsonl(folder / "validation.jsonl", with_ids(["v", "v"]))
    enqueued_spec(sqlite_env, finetune(folder))
    carved = jsonl(tmp_path / "carved.jsonl", with_ids(["same"] * 30))
    enqueued_spec(sqlite_env, generate(carved))
    ids = [e["id"] for s in ("train", "validation", "test")
           for e in examples_for(GenerateSpec(dataset=str(carved)), s, target_column="summary")]
    assert sorted(ids, key=int) == [str(i) for i in range(30)]


# --------------------------------------------------------------------------------- 9. empty carved splits
def test_split_empty_after_carving_is_refused(sqlite_env, tmp_path):
    tiny = jsonl(tmp_path / "tiny.jsonl", chats(5))  # 80/10/10 of 5 rows: train 4, validation 0, test 1
    check_rejected(sqlite_env, finetune(tiny), f"dataset file {tiny} has 5 rows: split 'validation' of its "
                                               "80/10/10 carving is empty")
    check_rejected(sqlite_env, generate(tiny, "--split", "validation"), "split 'validation' of its 80/10/10")
    three = jsonl(tmp_path / "three.jsonl", chats(3))  # train 2, validation 0, test 1
    check_rejected(sqlite_env, finetune(three), "has 3 rows: split 'validation' of its 80/10/10 carving is empty")
    assert len(examples_for(GenerateSpec(dataset=str(tiny)), "test", target_column="summary")) == 1
    enqueued_spec(sqlite_env, generate(tiny, "--split", "test"))
    enqueued_spec(sqlite_env, finetune(three, "--eval-split", "test"))
    enqueued_spec(sqlite_env, finetune(jsonl(tmp_path / "ten.jsonl", chats(10))))  # 8/1/1


def test_empty_file_in_a_split_folder(sqlite_env, tmp_path):
    folder = split_folder(tmp_path, chats(5), split="train")
    (folder / "validation.jsonl").write_text("\n\n")
    check_rejected(sqlite_env, finetune(folder), f"dataset file {folder / 'validation.jsonl'} is empty")


# ------------------------------------------------------------------------------------------- 9. model folders
def model_copy(sqlite_env, tmp_path, keep=lambda name: True):
    from pathlib import Path

    source = Path(sqlite_env["TUNEQUEUE_HOME"]) / "builtin" / "tiny-t5"
    target = tmp_path / "model"
    target.mkdir()
    for file in source.iterdir():
        if keep(file.name):
            shutil.copy(file, target / file.name)
    return target


def test_model_folder_with_config_but_no_weights(sqlite_env, tmp_path):
    folder = model_copy(sqlite_env, tmp_path, keep=lambda name: not name.endswith(".safetensors"))
    check_rejected(sqlite_env, ["finetune", "--name", "a", "--model", str(folder)],
                   "has a config.json but no weights (model.safetensors or pytorch_model.bin)")
    check_rejected(sqlite_env, ["generate", "--model", str(folder), "--model-kind", "seq2seq"], "but no weights")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                        "b.weight": "model-00002-of-00002.safetensors"}}))
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"")
    check_rejected(sqlite_env, ["generate", "--model", str(folder)],
                   "names weight file 'model-00002-of-00002.safetensors', which is missing")


def test_a_whole_model_folder_is_accepted(sqlite_env, tmp_path):
    folder = model_copy(sqlite_env, tmp_path)
    assert enqueued_spec(sqlite_env, ["generate", "--model", str(folder), "--limit", "2"])["model_kind"] == "seq2seq"


@pytest.mark.parametrize("config, held", [("[1, 2]", "an array"), ('"seq2seq"', "a string"), ("null", "null")])
def test_config_json_that_is_not_an_object(sqlite_env, tmp_path, config, held):
    folder = model_copy(sqlite_env, tmp_path)
    (folder / "config.json").write_text(config)
    expected = f"the config.json of model {str(folder)!r} is not a JSON object (it holds {held})"
    check_rejected(sqlite_env, ["finetune", "--name", "a", "--model", str(folder)], expected)
    # also when the model kind is given, so that the config is not needed to tell it
    check_rejected(sqlite_env, ["generate", "--model", str(folder), "--model-kind", "seq2seq"], expected)


# ------------------------------------------------------------------ 9. target modules: on the worker, at once
@pytest.fixture
def lab(tmp_path_factory, builtin_home):
    from models import make_session_factory
    from tests.conftest import sqlite_home
    from worker.ml.model_cache import ModelCache

    home, url = sqlite_home(tmp_path_factory, builtin_home, "targets-home")
    session = make_session_factory(url)()
    yield {"home": home, "session": session, "cache": ModelCache(home, device="cpu")}
    session.close()


@pytest.mark.parametrize("model, targets, expected", [
    ("tiny-t5", ["nope"], r"target modules nope match no layer of the model .*has layers named .*\bq\b"),
    ("tiny-t5", ["q", "v", "nope", "wq"], r"target modules nope, wq match no layer"),
    ("tiny-t5", ["q", "block"], r"target modules block \(encoder\.block is a ModuleList\) match modules that are "
                                r"not layers LoRA can wrap"),
    # PEFT trains a classifier's head whole (and everything named ...classifier): LoRA cannot wrap it as well
    ("tiny-bert", ["q_lin", "pre_classifier"], r"target modules pre_classifier match no layer of the model "
                                               r"\(pre_classifier: the classification head is trained whole"),
])
def test_target_modules_matching_no_layer_fail_at_once_as_input_error(lab, model, targets, expected):
    from models.jobs import JobKind
    from models.results import Adapter, LossPoint
    from tests.conftest import new_job
    from worker.jobs.finetune import train_adapter

    session, cache, home = lab["session"], lab["cache"], lab["home"]
    dataset = {"tiny-t5": "synthetic-dialogsum", "tiny-bert": "synthetic-sentiment"}[model]
    spec = FinetuneSpec(name="targets", model=model, dataset=dataset, target_modules=targets, max_steps=50,
                        train_limit=64)
    job = new_job(session, JobKind.finetune, spec)
    started = time.monotonic()
    with pytest.raises(InputError, match=expected) as info:
        train_adapter(spec, session, cache, home, job_id=job.id)
    assert time.monotonic() - started < 60
    assert "\n" not in str(info.value)
    # nothing trained or written, and PEFT never touched the resident base
    assert session.scalar(select(func.count(LossPoint.id)).where(LossPoint.job_id == job.id)) == 0
    assert session.scalar(select(func.count(Adapter.id))) == 0
    assert not (home / "adapters" / "targets").exists()
    (resident,) = [loaded.model for loaded in cache._models.values()]
    assert not any("lora" in name for name, _ in resident.named_modules())
    # the same base trains with real layer names right after
    layers = {"tiny-t5": ["q", "v"], "tiny-bert": ["q_lin", "v_lin"]}[model]
    ok = spec.model_copy(update={"name": "targets-ok", "target_modules": layers, "max_steps": 2,
                                 "eval_split": None})
    assert train_adapter(ok, session, cache, home)["steps"] == 2


def test_hub_rows_the_worker_reads_follow_the_same_rules(monkeypatch):
    """A hub dataset cannot be read before enqueue; the worker refuses its bad rows at once (InputError: the runner
    fails the job without retrying), naming the row."""
    import datasets

    rows = [{"dialogue": "A: hi", "summary": "hello"}, {"dialogue": "A: bye", "summary": None}]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list(rows))
    with pytest.raises(InputError, match=r"^hub dataset 'org/chats' split 'train': row 2: column 'summary' is null"):
        examples_for(FinetuneSpec(name="a", dataset="org/chats"), "train", target_column="summary")
    assert [e["target"] for e in examples_for(GenerateSpec(dataset="org/chats"), "train",
                                              target_column="summary")] == ["hello", None]


# ----------------------------------------------------- 10. JSON Lines split on "\n" only, separators are text
def separator_rows(n: int) -> list[dict]:
    return [{"dialogue": f"A: hello {i}{SEPARATORS[i % len(SEPARATORS)]}B: {SEPARATORS} bye {i}",
             "summary": f"A greets B{SEPARATORS[(i + 3) % len(SEPARATORS)]} ({i})."} for i in range(n)]


def raw_line(row: dict) -> str:
    """One JSON line holding the separators raw, including the control characters (\\x0b, \\x1c...) that
    json.dumps would escape."""
    line = json.dumps(row, ensure_ascii=False)
    for ch in SEPARATORS:
        line = line.replace(json.dumps(ch)[1:-1], ch)
    return line


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_json_lines_with_unicode_line_separators_inside_strings(sqlite_env, tmp_path, newline, suffix):
    rows = separator_rows(40)
    path = tmp_path / f"chats{suffix}"
    path.write_bytes((newline.join(raw_line(r) for r in rows) + newline).encode())
    assert all(ch in path.read_text(encoding="utf-8") for ch in SEPARATORS)
    assert check_dataset(str(path), ["dialogue", "summary"], ["train", "validation", "test"]) == "local"
    spec = GenerateSpec(dataset=str(path))
    examples = [e for s in ("train", "validation", "test") for e in examples_for(spec, s, target_column="summary")]
    assert len(examples) == 40
    for example in examples:
        row = rows[int(example["id"])]
        assert (example["text"], example["target"]) == (row["dialogue"], row["summary"])
    enqueued_spec(sqlite_env, finetune(path))


def test_line_numbers_count_newlines_only(sqlite_env, tmp_path):
    rows = separator_rows(30)
    rows[21]["summary"] = None
    path = tmp_path / "chats.jsonl"
    path.write_bytes(("\r\n".join(raw_line(r) for r in rows[:10]) + "\r\n\r\n"  # a blank line 11
                      + "\n".join(raw_line(r) for r in rows[10:]) + "\n").encode())
    check_rejected(sqlite_env, finetune(path), "line 23: column 'summary' is null")
    rows[21]["summary"] = "fine"
    path.write_bytes(("\n".join(raw_line(r) for r in rows[:10]) + "\n\n" + "\n".join(raw_line(r) for r in rows[10:])
                      + "\n{\"dialogue\": \u2028}\n").encode())
    check_rejected(sqlite_env, finetune(path), "line 32 is not valid JSON")


def test_csv_fields_keep_unicode_line_separators(tmp_path):
    import csv

    rows = separator_rows(20)
    path = tmp_path / "chats.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["dialogue", "summary"])
        writer.writeheader()
        writer.writerows(rows)
    examples = examples_for(GenerateSpec(dataset=str(path)), "train", target_column="summary")
    assert len(examples) == 16
    assert all(e["text"] == rows[int(e["id"])]["dialogue"] for e in examples)


def test_a_file_the_system_cannot_read_is_retried_and_bad_content_is_not(tmp_path, monkeypatch):
    """The worker retries what may pass (an OS read error, a hub that did not answer) and fails bad content at once."""
    import datasets

    from models.errors import Unavailable
    from worker.data import files
    from worker.data.examples import split_rows

    folder = tmp_path / "splits"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"dialogue": "a", "summary": "b"}\n')

    def unreadable(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files, "open", unreadable, raising=False)  # the data module's own open() only
    with pytest.raises(Unavailable, match="cannot read dataset .*Permission denied"):
        split_rows(str(folder), "train", 0)
    monkeypatch.undo()
    (folder / "train.jsonl").write_text("{not json\n")
    with pytest.raises(InputError, match="line 1 is not valid JSON"):
        split_rows(str(folder), "train", 0)

    def offline(*_args, **_kwargs):
        raise ConnectionError("the hub did not answer")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(Unavailable, match="the hub did not answer"):
        split_rows("someone/dialogs", "train", 0)
