"""LLM-as-judge: every summary rated 1-5 on relevance, coherence, consistency and fluency, with a short reason.

`judge(sources, summaries, options)` returns one `{criterion: Verdict}` per example. Nothing here assumes the
summaries were generated: rating a dataset's human references is the same call with the references as summaries.

Backends (`JudgeOptions.backend`):
- `local`: a Hugging Face causal LM from the worker's shared model cache (a built-in such as `tiny-llama`, a local
  folder or a hub id), batched with left padding. The prompt ends with "Score:" (after the chat template, when the
  tokenizer has one). `scoring="sample"` decodes a short reply greedily and parses it; `scoring="probabilities"`
  reads, as G-Eval does, the next-token probabilities of " 1" ... " 5" and returns the expected score sum(s * p(s))
  with the five normalised to sum to 1 (the distribution is kept in `raw`).
- `openai`: any OpenAI-compatible `POST {base_url}/chat/completions` (JUDGE_BASE_URL, JUDGE_API_KEY as a bearer
  token), temperature 0, at most `concurrency` requests at once, retries with exponential backoff (Retry-After
  honoured) on 429, 5xx, timeouts and dropped connections, and a budget of requests (retries count) and seconds.

A reply is parsed by `parse_reply`; one with no score, a score off the 1-5 scale or two different scores is a
Verdict with `parsed=False`, `score=None` and the reply in `raw`: kept, never dropped or guessed.

`on_result(index, verdicts)` is called in the caller's thread as each example completes, so the caller can commit in
chunks; `skip` holds indices already done (a resumed job). When the budget is spent no request is issued any more,
requests under way finish, and `JobFailed("judge budget spent: ...")` is raised after `on_result` has seen every
finished example. The API key is sent only in the Authorization header: it is not in any repr, log line or error
(error text is scrubbed of it as well); the HTTP client is urllib, which logs nothing.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable, Optional

from models.errors import InputError, JobFailed
from models.settings import mask_url
from models.specs import ScoreSpec
from worker.metrics.judge_prompts import CRITERIA, prompt_for

log = logging.getLogger("tunequeue.judge")

BACKENDS = ("local", "openai")
SCORINGS = ("sample", "probabilities")
SCALE = (1, 5)
SCORE_CUE = "Score:"
REASON_CHARS = 300  # a reason is cut to this
RAW_CHARS = 4000  # a reply (or a malformed response body) is kept up to this
MAX_BACKOFF_S = 30.0
MAX_RETRY_AFTER_S = 60.0
PROBABILITIES_REASON = "from token probabilities"

OnResult = Callable[[int, dict], None]


def _spec_default(name: str):
    """The score job's default for judge option `name` (models/specs.py is its home)."""
    return ScoreSpec.model_fields[f"judge_{name}"].default


@dataclass
class Verdict:
    criterion: str
    score: Optional[float]
    reason: str
    raw: Optional[str]
    parsed: bool


@dataclass
class JudgeOptions:
    backend: str = _spec_default("backend")
    model: str = "tiny-llama"
    scoring: str = "sample"
    concurrency: int = _spec_default("concurrency")  # openai: requests under way at once
    max_requests: Optional[int] = None  # openai: requests allowed, retries included (None: twice the prompts)
    max_seconds: Optional[float] = 3600.0  # the whole judge() call, either backend
    timeout_s: float = _spec_default("timeout_s")  # openai: per request (connect, and each wait for data)
    retries: int = 4  # openai: after the first attempt of a request
    batch_size: int = 8  # local: prompts per forward pass
    base_url: str = ""  # openai: e.g. https://api.openai.com/v1 (JUDGE_BASE_URL)
    api_key: str = ""  # openai: JUDGE_API_KEY; never shown
    max_new_tokens: int = 48  # local sample mode: reply length
    max_reply_tokens: int = 200  # openai: max_tokens of a reply
    backoff_s: float = 1.0  # openai: before the first retry, doubled each time

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["api_key"] = "***" if self.api_key else ""
        shown["base_url"] = mask_url(self.base_url)
        return f"JudgeOptions({', '.join(f'{name}={value!r}' for name, value in shown.items())})"

    __str__ = __repr__

    @classmethod
    def from_spec(cls, spec, settings) -> "JudgeOptions":
        """The options of a score job's spec (its `judge_*` fields) and the worker's settings (endpoint and key)."""
        given = {name: getattr(spec, f"judge_{name}", None) for name in (
            "backend", "model", "scoring", "concurrency", "max_requests", "max_seconds", "timeout_s")}
        options = cls(**{name: value for name, value in given.items() if value is not None},
                      base_url=settings.judge_base_url, api_key=settings.judge_api_key)
        options.check()
        return options

    def check(self) -> None:
        """InputError (one line) for options no judge run can use."""
        if self.backend not in BACKENDS:
            raise InputError(f"unknown judge backend {self.backend!r} (expected {' or '.join(BACKENDS)})")
        if self.scoring not in SCORINGS:
            raise InputError(f"unknown judge scoring {self.scoring!r} (expected {' or '.join(SCORINGS)})")
        if not self.model:
            raise InputError("the judge needs a model (--judge-model)")
        if self.backend == "openai":
            if self.scoring != "sample":
                raise InputError("judge scoring 'probabilities' needs the local backend (token probabilities of "
                                 "the model); the openai backend parses the reply")
            if not self.base_url:
                raise InputError("the openai judge backend needs JUDGE_BASE_URL (e.g. https://api.openai.com/v1) "
                                 "in the worker's environment")
        for name in ("concurrency", "retries", "batch_size", "max_requests", "max_new_tokens", "max_reply_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < (0 if name == "retries" else 1)):
                raise InputError(f"judge {name} must be a whole number of at least {0 if name == 'retries' else 1}")
        for name in ("max_seconds", "timeout_s", "backoff_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise InputError(f"judge {name} must be a number of seconds above 0")


# ------------------------------------------------------------------------------------------------------ parsing
_NUMBER = r"(\d+(?:\.\d+)?)"
_OUT_OF = r"(?:\s*(?:/|out\s+of|of)\s*(\d+))?"
_REASON_LABEL = re.compile(r"^\W*(?:reason|reasoning|explanation|justification|rationale)\W*?[:\-]\s*(.*)",
                           re.IGNORECASE | re.MULTILINE | re.DOTALL)


def parse_reply(criterion: str, text: Optional[str]) -> Verdict:
    """The score (1-5) and reason of a judge's reply. Accepted: "Score: 4", "**Score:** 4", "4/5", "Rating: 4 out of
    5", "Coherence: 4", a JSON object with a score/rating field, with text before or after. No score, a score off the
    scale or two different scores: `parsed=False`, score None, the reply kept in `raw`."""
    raw = (text or "")[:RAW_CHARS]
    found = _from_json(criterion, raw)
    if found is None:
        found = _from_text(criterion, raw)
    score, reason = found
    if score is None:
        return Verdict(criterion, None, "", raw, False)
    return Verdict(criterion, score, reason[:REASON_CHARS], raw, True)


def _from_json(criterion: str, text: str) -> Optional[tuple[Optional[float], str]]:
    """(score, reason) from a JSON object in the reply; None when there is none or it names no score."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        data = json.loads(text[start:end + 1])
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    lowered = {str(k).lower(): v for k, v in data.items()}
    key = next((k for k in ("score", "rating", criterion) if k in lowered), None)
    if key is None:
        return None
    value = lowered[key]
    if isinstance(value, dict):  # {"coherence": {"score": 4, "reason": ...}}
        lowered.update({str(k).lower(): v for k, v in value.items()})
        value = lowered.get("score", lowered.get("rating"))
    reason = next((str(lowered[k]) for k in ("reason", "reasoning", "explanation", "justification", "rationale")
                   if k in lowered), "")
    if isinstance(value, bool):
        return None, ""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*" + _NUMBER + _OUT_OF + r"\s*", value, re.IGNORECASE)
        value = _on_scale(match[1], match[2]) if match else None
    elif isinstance(value, (int, float)):
        value = _on_scale(str(value), None)
    else:
        value = None
    return value, reason.strip()


def _from_text(criterion: str, text: str) -> tuple[Optional[float], str]:
    plain = re.sub(r"[*_`#]", "", text)  # markdown emphasis around labels and numbers
    label = rf"(?:score|rating|grade|{re.escape(criterion)})"
    labelled = re.compile(rf"\b{label}\b(?:\s*\([^)]*\))?\s*(?:[:=\-]|is|of)\s*\"?{_NUMBER}\"?{_OUT_OF}",
                          re.IGNORECASE)
    found = [(m[1], m[2], m.end()) for m in labelled.finditer(plain)]
    if not found:
        found = [(m[1], m[2], m.end()) for m in
                 re.finditer(rf"(?<![\d.]){_NUMBER}\s*(?:/|out\s+of)\s*(\d+)", plain, re.IGNORECASE)]
    if not found:
        match = re.match(rf"\s*{_NUMBER}(?![\d/])\s*(?:[.)\n]|$)", plain)  # a bare number first: "4\nThe summary…"
        found = [(match[1], None, match.end())] if match else []
    scores = {_on_scale(number, scale) for number, scale, _ in found}
    if len(scores) != 1 or None in scores:
        return None, ""
    reason = _REASON_LABEL.search(plain)
    if reason:
        reason_text = reason[1]
    else:  # what follows the (last) score
        reason_text = plain[found[-1][2]:]
    reason_text = re.sub(r"\s+", " ", reason_text).strip(" .:-\n")
    return scores.pop(), reason_text


def _on_scale(number: str, out_of: Optional[str]) -> Optional[float]:
    try:
        value = float(number)
    except ValueError:
        return None
    if out_of is not None and int(out_of) != SCALE[1]:
        return None
    return value if SCALE[0] <= value <= SCALE[1] else None


# ------------------------------------------------------------------------------------------------------ judging
@dataclass
class _Task:
    index: int
    criterion: str
    source: str
    summary: str


class _BudgetSpent(Exception):
    pass


class JudgeEndpointError(RuntimeError):
    """The endpoint kept failing (5xx, 429, timeouts) through every retry: a passing failure, so the job is retried
    and resumes after the examples already stored."""


class _Budget:
    """Requests and seconds left to one judge() call; `stop()` wakes every thread waiting in a backoff."""

    def __init__(self, max_requests: Optional[int], max_seconds: Optional[float]):
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.started = time.monotonic()
        self.requests = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def seconds_left(self) -> float:
        return float("inf") if self.max_seconds is None else self.max_seconds - self.elapsed()

    def take(self, count: int = 1) -> None:
        """Count `count` requests about to be issued, or raise _BudgetSpent."""
        with self._lock:
            if self._stopped.is_set():
                raise _BudgetSpent()
            if self.seconds_left() <= 0 or (self.max_requests is not None
                                            and self.requests + count > self.max_requests):
                self._stopped.set()
                raise _BudgetSpent()
            self.requests += count

    def sleep(self, seconds: float) -> None:
        """A backoff; _BudgetSpent when it would outlast the seconds left, or when stopped meanwhile."""
        if seconds >= self.seconds_left() or self._stopped.wait(seconds):
            self._stopped.set()
            raise _BudgetSpent()

    def stop(self) -> None:
        self._stopped.set()


def judge(sources: list[str], summaries: list[str], options: JudgeOptions, *, cache=None,
          on_result: Optional[OnResult] = None, skip: Iterable[int] = ()) -> list[dict[str, Verdict]]:
    """Rate each summary against its source on every criterion: one {criterion: Verdict} per example ({} for the
    indices in `skip`). `cache` is the worker's ModelCache (local backend)."""
    if len(sources) != len(summaries):
        raise ValueError(f"{len(sources)} sources but {len(summaries)} summaries")
    options.check()
    skipped = set(skip)
    tasks = [_Task(i, criterion, source or "", summary or "") for i, (source, summary) in
             enumerate(zip(sources, summaries)) if i not in skipped for criterion in CRITERIA]
    results: list[dict[str, Verdict]] = [{} for _ in sources]
    budget = _Budget(options.max_requests or 2 * len(tasks), options.max_seconds)
    done = 0

    def finish(task: _Task, verdict: Verdict) -> None:
        nonlocal done
        results[task.index][task.criterion] = verdict
        if len(results[task.index]) == len(CRITERIA):
            done += 1
            if on_result:
                on_result(task.index, results[task.index])

    todo = len({t.index for t in tasks})
    try:
        if options.backend == "local":
            _judge_local(tasks, options, cache, budget, finish)
        else:
            _judge_openai(tasks, options, budget, finish)
    except _BudgetSpent:
        seconds = "no" if options.max_seconds is None else f"{options.max_seconds:g}"
        raise JobFailed(_scrub(f"judge budget spent: {budget.requests} requests / {budget.elapsed():.1f} s; {done} "
                               f"of {todo} examples judged (limits: {budget.max_requests} requests, {seconds} s)",
                               options)) from None
    except JudgeEndpointError as exc:
        raise JudgeEndpointError(_scrub(f"{exc}; {done} of {todo} examples judged", options)) from None
    unparsed = sum(not v.parsed for r in results for v in r.values())
    log.info("judge: %d examples x %d criteria by %s model %s (%s): %d requests, %d unparsed, %.1f s", todo,
             len(CRITERIA), options.backend, options.model, options.scoring, budget.requests, unparsed,
             budget.elapsed())
    return results


def _scrub(text: str, options: JudgeOptions) -> str:
    """The text without the API key, should an error (or a server's reply) ever echo it."""
    return text.replace(options.api_key, "***") if options.api_key else text


# -------------------------------------------------------------------------------------------------- local backend
def _judge_local(tasks: list[_Task], options: JudgeOptions, cache, budget: _Budget,
                 finish: Callable[[_Task, Verdict], None]) -> None:
    import torch

    if cache is None:
        raise ValueError("the local judge backend needs the worker's model cache")
    if not tasks:
        return
    loaded = cache.get(options.model, "causal")
    tokenizer = loaded.tokenizer
    positions = getattr(loaded.model.config, "max_position_embeddings", None) or 4096
    reserve = options.max_new_tokens if options.scoring == "sample" else 1
    limit = positions - reserve
    with cache.with_adapter(loaded, None) as model, torch.inference_mode():
        for start in range(0, len(tasks), options.batch_size):
            batch = tasks[start:start + options.batch_size]
            budget.take(len(batch))
            texts = [_local_prompt(tokenizer, t, limit) for t in batch]
            if options.scoring == "probabilities":
                verdicts = _by_probabilities(model, loaded, batch, texts, limit)
            else:
                verdicts = _by_sampling(model, loaded, batch, texts, limit, options.max_new_tokens)
            for task, verdict in zip(batch, verdicts):
                finish(task, verdict)


def _local_prompt(tokenizer, task: _Task, limit: int) -> str:
    """The prompt as text, ending with the score cue; the source is shortened when it would not fit in `limit`."""
    def render(source: str) -> str:
        prompt = prompt_for(task.criterion, source, task.summary)
        if getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True)
            return prompt + SCORE_CUE
        return prompt + "\n" + SCORE_CUE

    text = render(task.source)
    over = len(_encode(tokenizer, text)) - limit
    if over > 0:
        source_ids = tokenizer(task.source, add_special_tokens=False)["input_ids"]
        keep = max(0, len(source_ids) - over - 8)
        text = render(tokenizer.decode(source_ids[:keep]) + " [...]")
    return text


def _encode(tokenizer, text: str) -> list[int]:
    # a chat template writes its own special tokens
    return tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]


def _batch(ids: list[list[int]], loaded) -> dict:
    from worker.ml.features import attention_mask, pad

    input_ids = pad(ids, loaded.tokenizer.pad_token_id, left=True).to(loaded.device)
    mask = attention_mask(ids, left=True).to(loaded.device)
    return {"input_ids": input_ids, "attention_mask": mask}


def _by_sampling(model, loaded, batch: list[_Task], texts: list[str], limit: int,
                 max_new_tokens: int) -> list[Verdict]:
    tokenizer = loaded.tokenizer
    ids = [_encode(tokenizer, text)[-limit:] for text in texts]
    inputs = _batch(ids, loaded)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                            pad_token_id=tokenizer.pad_token_id)
    replies = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    verdicts = []
    for task, reply in zip(batch, replies):
        raw = SCORE_CUE + reply
        verdict = parse_reply(task.criterion, _first_answer(raw))
        verdict.raw = raw[:RAW_CHARS]
        verdicts.append(verdict)
    return verdicts


def _first_answer(reply: str) -> str:
    """The reply up to the end of its Reason line: a base model goes on writing (often another "Score: N")."""
    match = re.search(r"\breason\b[^\n]*", reply, re.IGNORECASE)
    return reply[:match.end()] if match else reply.split("\n\n", 1)[0]


def _by_probabilities(model, loaded, batch: list[_Task], texts: list[str], limit: int) -> list[Verdict]:
    """G-Eval's expected score: the next-token probabilities of the five scores after the cue, normalised."""
    import torch

    tokenizer = loaded.tokenizer
    prefixes, digit_ids = [], []
    for text in texts:
        prefix, digits = _score_tokens(tokenizer, text)
        prefixes.append(prefix[-limit:])
        digit_ids.append(digits)
    inputs = _batch(prefixes, loaded)
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # left padding: count from each row's start
    logits = model(**inputs, position_ids=positions).logits[:, -1, :].float()
    probabilities = torch.softmax(logits, dim=-1)
    picked = probabilities.gather(1, torch.tensor(digit_ids, device=probabilities.device))
    mass = picked.sum(-1)
    normalised = picked / mass.unsqueeze(-1)
    scale = torch.arange(SCALE[0], SCALE[1] + 1, device=normalised.device, dtype=normalised.dtype)
    expected = (normalised * scale).sum(-1)
    verdicts = []
    for i, task in enumerate(batch):
        shares = " ".join(f"{s}:{p:.3f}" for s, p in zip(range(SCALE[0], SCALE[1] + 1), normalised[i].tolist()))
        raw = f"p(score) {shares} (the five scores held {mass[i].item():.3g} of the next-token probability)"
        verdicts.append(Verdict(task.criterion, round(expected[i].item(), 4), PROBABILITIES_REASON, raw, True))
    return verdicts


def _score_tokens(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """(ids to feed, the token id that starts each score 1..5 next): the common prefix of the text followed by
    " 1" ... " 5", so a tokenizer that spells the space as a token of its own, or merges it into the digit, works."""
    variants = [_encode(tokenizer, f"{text} {s}") for s in range(SCALE[0], SCALE[1] + 1)]
    common = 0
    while all(len(v) > common for v in variants) and len({v[common] for v in variants}) == 1:
        common += 1
    digits = [v[common] if len(v) > common else None for v in variants]
    if None in digits or len(set(digits)) != len(digits):
        raise JobFailed("the judge model's tokenizer gives the scores 1-5 no distinct next token after "
                        f"{SCORE_CUE!r}; use the sample scoring instead")
    return variants[0][:common], digits


# ------------------------------------------------------------------------------------------------- openai backend
def _judge_openai(tasks: list[_Task], options: JudgeOptions, budget: _Budget,
                  finish: Callable[[_Task, Verdict], None]) -> None:
    url = options.base_url.rstrip("/")
    if not url.endswith("/chat/completions"):
        url += "/chat/completions"
    headers = {"Content-Type": "application/json", "User-Agent": "tunequeue-judge"}
    if options.api_key:
        headers["Authorization"] = f"Bearer {options.api_key}"
    failure: Optional[BaseException] = None
    pool = ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix="tunequeue-judge")
    try:
        futures = {pool.submit(_stopping_on_failure, budget, _ask, url, headers, task, options, budget): task
                   for task in tasks}
        for future in as_completed(futures):
            try:
                verdict = future.result()
            except Exception as exc:  # the first failure stops the rest; examples already done are kept
                if failure is None:
                    failure = exc
                    budget.stop()  # tasks not yet started end at once (cancelled futures would stall as_completed)
                continue
            finish(futures[future], verdict)
    except BaseException:
        budget.stop()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if failure is not None:
        raise failure


def _stopping_on_failure(budget: _Budget, function, *args):
    """`function(*args)`; its failure stops the tasks that have not started yet before the next one can start."""
    try:
        return function(*args)
    except BaseException:
        budget.stop()
        raise


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as the HTTP error it is: urllib would follow it with the Authorization header, handing
    the key to whatever host (or plain-http URL) the endpoint names."""

    def redirect_request(self, *_args, **_kwargs):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _ask(url: str, headers: dict, task: _Task, options: JudgeOptions, budget: _Budget) -> Verdict:
    body = json.dumps({"model": options.model, "temperature": 0, "max_tokens": options.max_reply_tokens,
                       "messages": [{"role": "user", "content": prompt_for(task.criterion, task.source,
                                                                            task.summary)}]}).encode()
    for attempt in range(options.retries + 1):
        budget.take()
        timeout = min(options.timeout_s, max(budget.seconds_left(), 0.1))
        request = urllib.request.Request(url, data=body, method="POST", headers=headers)
        retry_after = None
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                return parse_reply(task.criterion, _reply_text(response.read()))
        except urllib.error.HTTPError as exc:
            why = f"HTTP {exc.code}"
            if exc.code != 429 and exc.code < 500:  # a wrong key, model or URL: no retry helps
                detail = exc.read(300).decode("utf-8", "replace").strip().replace("\n", " ")
                raise JobFailed(_scrub(f"judge endpoint {mask_url(url)} refused the request: {why} {detail}",
                                       options)) from None
            retry_after = _retry_after(exc.headers.get("Retry-After"))
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:  # timeouts, refused, reset
            reason = getattr(exc, "reason", None) or exc
            why = f"{type(reason).__name__}: {str(reason).strip()[:200]}".rstrip(": ")
        if attempt == options.retries:
            raise JudgeEndpointError(_scrub(f"judge endpoint {mask_url(url)} failed {attempt + 1} times, last: {why}",
                                            options))
        wait = retry_after if retry_after is not None else min(options.backoff_s * 2 ** attempt, MAX_BACKOFF_S)
        log.warning("judge request (%s) failed: %s; retry %d of %d in %.1f s", task.criterion,
                    _scrub(why, options), attempt + 1, options.retries, wait)
        budget.sleep(wait)
    raise AssertionError("unreachable")


def _reply_text(body: bytes) -> str:
    """The first choice's message content; the body itself when it is not a chat completion (then unparsed)."""
    text = body.decode("utf-8", "replace")
    try:
        content: Any = json.loads(text)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return text[:RAW_CHARS]
    if isinstance(content, list):  # content parts
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else text[:RAW_CHARS]


def _retry_after(value: Optional[str]) -> Optional[float]:
    """Retry-After in seconds (capped); None when absent or an HTTP date (then the backoff applies)."""
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S) if value else None
    except ValueError:
        return None
