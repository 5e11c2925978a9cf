"""One point of a sweep the way the fine-tuning tools tunequeue competes with run it (AutoTrain, LLaMA-Factory,
Axolotl and H2O LLM Studio generate scripts of this shape): one fresh process that imports, loads the base, tokenizes
with `datasets.map`, trains with `Seq2SeqTrainer`, reloads base + adapter for `predict(predict_with_generate=True)`,
scores with `rouge_score` and exits. Hugging Face defaults everywhere except what the sweep fixes (learning rate,
LoRA rank and alpha on q,v, epochs, batch size, generated tokens). Used by bench/night.py, which starts one process
per point; the last line printed is a JSON object with the point's ROUGE and where its time went (wall-clock
`time.time()` marks, so the parent can add the process start before the first one).

    python bench/peer_recipe.py --model DIR --data DIR --out DIR --learning-rate 3e-3 --lora-r 16
"""

import time

STARTED = time.time()  # the interpreter is up; bench/night.py counts what came before as process start

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
from datasets import load_dataset  # noqa: E402
from peft import LoraConfig, PeftModel, TaskType, get_peft_model  # noqa: E402
from rouge_score import rouge_scorer  # noqa: E402
from transformers import (AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, Seq2SeqTrainer,  # noqa: E402
                          Seq2SeqTrainingArguments)

IMPORTED = time.time()
PROMPT = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "  # the same prompt tunequeue uses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="a folder saved with save_pretrained")
    parser.add_argument("--data", required=True, help="a folder with train.jsonl and test.jsonl")
    parser.add_argument("--out", required=True)
    parser.add_argument("--learning-rate", type=float, required=True)
    parser.add_argument("--lora-r", type=int, required=True)
    parser.add_argument("--lora-alpha", type=float, default=32)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-source-length", type=int, default=256)
    parser.add_argument("--max-target-length", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--test-limit", type=int, default=100)
    args = parser.parse_args()
    marks = {"started": STARTED, "imported": IMPORTED}

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSeq2SeqLM.from_pretrained(args.model)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=args.lora_r,
                                             lora_alpha=args.lora_alpha, target_modules=["q", "v"]))
    marks["model_loaded"] = time.time()

    data = load_dataset("json", data_files={"train": os.path.join(args.data, "train.jsonl"),
                                            "test": os.path.join(args.data, "test.jsonl")})
    data["test"] = data["test"].select(range(min(args.test_limit, len(data["test"]))))

    def preprocess(batch):
        inputs = tokenizer([PROMPT.format(dialogue=d) for d in batch["dialogue"]], max_length=args.max_source_length,
                           truncation=True)
        inputs["labels"] = tokenizer(text_target=batch["summary"], max_length=args.max_target_length,
                                     truncation=True)["input_ids"]
        return inputs

    tokenized = data.map(preprocess, batched=True, remove_columns=data["train"].column_names)
    marks["tokenized"] = time.time()

    training_args = Seq2SeqTrainingArguments(
        output_dir=args.out, learning_rate=args.learning_rate, num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, predict_with_generate=True, generation_num_beams=1,
        generation_max_length=args.max_new_tokens + 1, report_to="none")  # + the decoder's start token
    collator = DataCollatorForSeq2Seq(tokenizer, model=model)
    trainer = Seq2SeqTrainer(model=model, args=training_args, train_dataset=tokenized["train"],
                             data_collator=collator, processing_class=tokenizer)
    train_output = trainer.train()
    trainer.save_model(args.out)
    marks["trained"] = time.time()

    # the evaluation step: the base again, the saved adapter on it (the tools' separate predict run)
    model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(args.model), args.out)
    predictor = Seq2SeqTrainer(model=model, args=training_args, data_collator=collator, processing_class=tokenizer)
    marks["reloaded"] = time.time()
    output = predictor.predict(tokenized["test"])
    predictions = np.where(output.predictions != -100, output.predictions, tokenizer.pad_token_id)
    texts = [t.strip() for t in tokenizer.batch_decode(predictions, skip_special_tokens=True)]
    marks["generated"] = time.time()

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    scores = [scorer.score(reference, prediction) for reference, prediction in zip(data["test"]["summary"], texts)]
    rouge = {key: float(np.mean([s[key].fmeasure for s in scores])) for key in scores[0]}
    marks["scored"] = time.time()
    print(json.dumps({"marks": marks, "rouge": rouge, "train_loss": train_output.training_loss,
                      "steps": train_output.global_step, "examples": len(texts)}), flush=True)


if __name__ == "__main__":
    main()
