"""Data sources: every local format with non-default column names, split folders, limits and seeded subsets, the
alpaca format, one-line errors from the pre-enqueue dataset check, and the CLI's data options."""

from __future__ import annotations

import csv
import json

import pytest

from models.errors import InputError, Unavailable
from models.specs import FinetuneSpec, GenerateSpec
from tests.conftest import check_rejected, enqueued_spec
from worker.data.examples import ALPACA_PROMPT_TEMPLATE, ALPACA_PROMPT_TEMPLATE_NO_INPUT, examples_for
from worker.data.refs import check_dataset

ROWS = [{"conversation": f"A: hello {i}, ok?\nB: bye {i}", "gist": f"A greets B ({i}).",
         "sentiment": "positive" if i % 3 else "negative"} for i in range(50)]
COLUMNS = dict(text_column="conversation", summary_column="gist", label_column="sentiment")


def write(path, rows, fmt=None):
    """Write `rows` at `path` in the format its suffix names; `fmt` 'json-lines' or 'json-data' for a .json holding
    JSON Lines or an object with a "data" array."""
    if fmt == "json-lines" or path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif fmt == "json-data":
        path.write_text(json.dumps({"version": 1, "data": rows}))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def spec_for(dataset, **fields):
    return GenerateSpec(dataset=str(dataset), **{**COLUMNS, "seed": 3, **fields})


def all_splits(spec, target="gist"):
    return {s: examples_for(spec, s, target_column=target) for s in ("train", "validation", "test")}


@pytest.fixture
def jsonl(tmp_path):
    return write(tmp_path / "chats.jsonl", ROWS)


@pytest.mark.parametrize("name, fmt", [("chats.jsonl", None), ("chats.json", None), ("lines.json", "json-lines"),
                                       ("wrapped.json", "json-data"), ("chats.csv", None), ("chats.parquet", None),
                                       ("saved", None)])
def test_single_source_carved_80_10_10_the_same_in_every_format(tmp_path, jsonl, name, fmt):
    path = write(tmp_path / name, ROWS, fmt)
    assert check_dataset(str(path), ["conversation", "gist", "sentiment"], ["train", "validation", "test"]) == "local"
    splits = all_splits(spec_for(path))
    assert [len(v) for v in splits.values()] == [40, 5, 5]
    assert sorted(int(e["id"]) for v in splits.values() for e in v) == list(range(50))
    for example in splits["test"]:
        row = ROWS[int(example["id"])]
        assert (example["text"], example["target"]) == (row["conversation"], row["gist"])
        assert example["source"] == f"Summarize the following conversation.\n\n{row['conversation']}\n\nSummary: "
    assert splits == all_splits(spec_for(jsonl)), "every format carves the same split for the same seed"
    assert splits == all_splits(spec_for(path)), "deterministic"
    assert all_splits(spec_for(path, seed=4))["test"] != splits["test"]
    labels = examples_for(spec_for(path), "test", target_column="sentiment")
    assert [e["target"] for e in labels] == [ROWS[int(e["id"])]["sentiment"] for e in labels]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_folder_of_split_files(tmp_path, suffix):
    rows = [{"id": f"ex{i}", **r} for i, r in enumerate(ROWS)]
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder / f"train{suffix}", rows[:30])
    write(folder / f"dev{suffix}", rows[30:])
    check_dataset(str(folder), ["conversation", "gist"], ["train", "dev"])
    spec = spec_for(folder)
    dev = examples_for(spec, "dev", target_column="gist")
    assert [e["id"] for e in dev] == [f"ex{i}" for i in range(30, 50)]
    assert dev[0]["text"] == ROWS[30]["conversation"] and dev[0]["target"] == ROWS[30]["gist"]
    with pytest.raises(InputError, match=r"has no 'test' split \(found: dev, train\)"):
        check_dataset(str(folder), ["conversation"], ["test"])


def test_dataset_dict_saved_to_disk_keeps_its_splits_and_label_names(tmp_path):
    import datasets

    features = datasets.Features({"conversation": datasets.Value("string"), "gist": datasets.Value("string"),
                                  "sentiment": datasets.ClassLabel(names=["negative", "positive"])})
    parts = {"train": ROWS[:40], "test": ROWS[40:]}
    datasets.DatasetDict({split: datasets.Dataset.from_list(rows, features=features)
                          for split, rows in parts.items()}).save_to_disk(str(tmp_path / "dd"))
    ref = str(tmp_path / "dd")
    assert check_dataset(ref, ["conversation", "sentiment"], ["train", "test"]) == "local"
    test = examples_for(spec_for(ref), "test", target_column="sentiment")
    assert [e["text"] for e in test] == [r["conversation"] for r in ROWS[40:]]
    assert [e["target"] for e in test] == [r["sentiment"] for r in ROWS[40:]], "ClassLabel ints become names"
    with pytest.raises(InputError, match="has splits train, test, not 'validation'"):
        check_dataset(ref, ["conversation"], ["validation"])
    with pytest.raises(InputError, match=r"has no column 'gist_x' \(columns: conversation, gist, sentiment\)"):
        check_dataset(ref, ["gist_x"], ["train"])


def test_limit_and_seeded_shuffle(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder / "train.parquet", ROWS)
    spec = FinetuneSpec(name="a", dataset=str(folder), **COLUMNS)
    first = examples_for(spec, "train", target_column="gist", limit=10)
    assert [e["id"] for e in first] == [str(i) for i in range(10)]
    subset = examples_for(spec, "train", target_column="gist", limit=10, shuffle=True)
    assert len(subset) == 10 and subset != first
    assert subset == examples_for(spec, "train", target_column="gist", limit=10, shuffle=True)
    other = examples_for(spec.model_copy(update={"seed": spec.seed + 1}), "train", target_column="gist", limit=10,
                         shuffle=True)
    assert [e["id"] for e in other] != [e["id"] for e in subset]
    everything = examples_for(spec, "train", target_column="gist", shuffle=True)
    assert everything[:10] == subset, "the limit takes a prefix of the seeded order"
    assert sorted(int(e["id"]) for e in everything) == list(range(50))


def test_alpaca_rows_map_onto_prompt_and_target(tmp_path):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hello {input}.", "input": "", "output": "hello"}]
    path = write(tmp_path / "alpaca.jsonl", rows)
    assert check_dataset(str(path), ["instruction", "output"], ["train"], data_format="alpaca") == "local"
    folder = tmp_path / "alpaca"
    folder.mkdir()
    write(folder / "train.json", rows)
    spec = GenerateSpec(dataset=str(folder), data_format="alpaca")
    first, second = examples_for(spec, "train", target_column="summary")
    assert first["text"] == "Add the numbers.\n\n2 and 3" and first["target"] == "5"
    assert first["source"] == ALPACA_PROMPT_TEMPLATE.replace("{instruction}", "Add the numbers.").replace(
        "{input}", "2 and 3")
    assert second["text"] == "Say hello {input}." and second["target"] == "hello"
    assert second["source"] == ALPACA_PROMPT_TEMPLATE_NO_INPUT.replace("{instruction}", "Say hello {input}.")
    custom = spec.model_copy(update={"prompt_template": "Q: {instruction} | {input} | {text} A:"})
    assert examples_for(custom, "train", target_column=None)[0] == {
        "id": "0", "text": "Add the numbers.\n\n2 and 3", "target": None,
        "source": "Q: Add the numbers. | 2 and 3 | Add the numbers.\n\n2 and 3 A:"}
    with pytest.raises(InputError, match="no column 'output'.*--format alpaca reads instruction"):
        check_dataset(str(write(tmp_path / "no-output.csv", [{"instruction": "x", "input": ""}])),
                      ["instruction", "output"], ["train"], data_format="alpaca")


def one_line_error(ref, columns=("conversation",), splits=("train",), **kwargs) -> str:
    with pytest.raises(InputError) as info:
        check_dataset(str(ref), list(columns), list(splits), **kwargs)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


def test_bad_local_data_gives_one_line_errors(tmp_path, jsonl):
    assert "has no column 'dialogue' (columns: conversation, gist, sentiment)" in one_line_error(
        jsonl, ["dialogue"])
    assert "has splits train, validation, test (80/10/10 by seed), not 'dev'" in one_line_error(jsonl, splits=["dev"])
    (tmp_path / "notes.txt").write_text("conversation\nhi\n")
    assert "unknown format '.txt'" in one_line_error(tmp_path / "notes.txt")
    (tmp_path / "broken.json").write_text('[{"conversation": "hi"}, {"conversation": ]')
    assert "broken.json: not valid JSON at line 1" in one_line_error(tmp_path / "broken.json")
    (tmp_path / "broken.jsonl").write_text('{"conversation": "hi"}\n{"conversation": "hi"\n')
    assert "broken.jsonl: line 2 is not valid JSON" in one_line_error(tmp_path / "broken.jsonl")
    (tmp_path / "scalars.jsonl").write_text('{"conversation": "hi"}\n3\n')
    assert "record 2 is not a JSON object" in one_line_error(tmp_path / "scalars.jsonl")
    (tmp_path / "ragged.csv").write_text("conversation,gist\nhi,there\nhi,there,again\n")
    assert "line 3 has more fields than the header" in one_line_error(tmp_path / "ragged.csv")
    (tmp_path / "bad.parquet").write_bytes(b"not a parquet file at all")
    assert "cannot read dataset" in one_line_error(tmp_path / "bad.parquet")
    (tmp_path / "empty").mkdir()
    assert "holds no split files" in one_line_error(tmp_path / "empty")
    assert "--dataset-config is for hub datasets" in one_line_error(jsonl, dataset_config="3.0.0")
    assert "has columns text, label; no column 'conversation'" in one_line_error("synthetic-sentiment")


def test_hub_dataset_passes_its_config_and_fails_in_one_line(monkeypatch):
    import datasets

    calls = []

    def offline(name, config=None, split=None):
        calls.append((name, config, split))
        raise ConnectionError("Couldn't reach 'org/chats' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(Unavailable) as info:  # a hub that did not answer may answer on the worker's retry
        examples_for(GenerateSpec(dataset="org/chats", dataset_config="3.0.0"), "test", target_column="summary")
    assert calls == [("org/chats", "3.0.0", "test")]
    assert str(info.value) == ("cannot load hub dataset 'org/chats' (config '3.0.0') split 'test': ConnectionError: "
                               "Couldn't reach 'org/chats' on the Hub (LocalEntryNotFoundError) (needs the network "
                               "or the local Hugging Face cache)")


def test_builtin_datasets_come_from_one_registry():
    sentiment = examples_for(GenerateSpec(dataset="synthetic-sentiment"), "validation", target_column="label",
                             limit=3)
    assert len(sentiment) == 3 and sentiment[0]["target"] in ("positive", "negative")
    assert examples_for(GenerateSpec(), "test", target_column="summary", limit=2)[1]["id"] == "test-1"


# ---------------------------------------------------------------------------------------------------- the CLI
def test_cli_accepts_a_parquet_file_with_its_column_names(sqlite_env, tmp_path):
    path = write(tmp_path / "chats.parquet", ROWS)
    check_rejected(sqlite_env, ["finetune", "--name", "pq", "--dataset", str(path), "--text-column",
                                "conversation"], "has no column 'summary' (columns: conversation, gist, sentiment)")
    spec = enqueued_spec(sqlite_env, ["finetune", "--name", "pq", "--dataset", str(path), "--text-column",
                                      "conversation", "--summary-column", "gist", "--eval-split", "test",
                                      "--eval-limit", "5", "--train-limit", "8"])
    assert (spec["dataset"], spec["text_column"], spec["summary_column"]) == (str(path), "conversation", "gist")
    assert (spec["eval_split"], spec["eval_limit"], spec["train_limit"]) == ("test", 5, 8)


def test_cli_rejects_bad_data_before_enqueue(sqlite_env, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder / "train.csv", ROWS)
    args = ["finetune", "--name", "a", "--dataset", str(folder), "--text-column", "conversation",
            "--summary-column", "gist"]
    check_rejected(sqlite_env, args, "has no 'validation' split (found: train)")
    check_rejected(sqlite_env, args + ["--eval-split", "train", "--format", "alpaca"], "no column 'instruction'")
    check_rejected(sqlite_env, args + ["--eval-split", "train", "--dataset-config", "x"], "is for hub datasets")
    check_rejected(sqlite_env, ["generate", "--dataset", str(folder), "--text-column", "conversation",
                                "--test-split", "dev"], "has no 'dev' split")
    (tmp_path / "broken.json").write_text("[{")
    check_rejected(sqlite_env, ["generate", "--dataset", str(tmp_path / "broken.json")], "not valid JSON")


def test_cli_reads_the_prompt_template_file(sqlite_env, tmp_path, jsonl):
    template = tmp_path / "prompt.txt"
    template.write_text("Chat:\n{text}\nGist:\n")
    args = ["generate", "--dataset", str(jsonl), "--text-column", "conversation", "--split", "validation"]
    check_rejected(sqlite_env, args + ["--prompt-template-file", str(tmp_path / "missing.txt")],
                   "cannot read --prompt-template-file")
    check_rejected(sqlite_env, args + ["--prompt-template-file", str(template), "--prompt-template", "{text}"],
                   "either --prompt-template or --prompt-template-file")
    spec = enqueued_spec(sqlite_env, args + ["--prompt-template-file", str(template)])
    assert spec["prompt_template"] == "Chat:\n{text}\nGist:"
    assert (spec["split"], spec["summary_column"], spec["data_format"]) == ("validation", "summary", "columns")
