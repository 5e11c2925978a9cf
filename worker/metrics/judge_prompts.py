"""The judge's rubrics: one prompt per criterion (what it means, how to check it, what each score stands for).

Written for tunequeue in the manner of G-Eval (Liu et al., 2023): a definition, evaluation steps the judge is asked to
follow, and a 1-5 scale with its ends described. The reply format is fixed ("Score: N" then "Reason: ...") so that
`worker.metrics.judge.parse_reply` can read it; the parser also takes the usual variations.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.metrics import JUDGE_CRITERIA as CRITERIA  # relevance, coherence, consistency, fluency


@dataclass(frozen=True)
class Rubric:
    definition: str
    steps: tuple[str, ...]
    low: str  # what a 1 means
    high: str  # what a 5 means


RUBRICS: dict[str, Rubric] = {
    "relevance": Rubric(
        definition="Relevance: does the summary keep what matters in the source and leave out what does not? A "
                   "relevant summary carries the main point, the people involved and any decision, time or place "
                   "that the source settles, without filler or side remarks.",
        steps=("Read the source and list to yourself the few facts a reader would need.",
               "Check which of those facts the summary states.",
               "Note anything in the summary that is minor, repeated or not about the source's main point.",
               "Give the score from how much of what matters is there and how little that does not."),
        low="misses the main point or is mostly about side matters",
        high="has every important fact and nothing unimportant"),
    "coherence": Rubric(
        definition="Coherence: does the summary read as one well-organised whole? Its sentences should follow "
                   "from one another in a sensible order and together tell the reader what happened, rather than "
                   "being a heap of loosely related statements.",
        steps=("Read the source to know what the summary should convey.",
               "Read the summary and follow how each sentence connects to the one before.",
               "Look for jumps, contradictions between sentences, an odd order or a missing link that leaves the "
               "reader guessing.",
               "Give the score from how clearly the summary holds together."),
        low="disjointed: the parts do not connect or come in a confusing order",
        high="flows naturally from start to end and is easy to follow"),
    "consistency": Rubric(
        definition="Consistency: is every statement in the summary supported by the source? Names, numbers, "
                   "times, places and who did what must match the source; a summary that adds facts the source does "
                   "not contain, however plausible, is not consistent.",
        steps=("Read the source carefully.",
               "Take each claim of the summary in turn and find where the source supports it.",
               "Mark claims that contradict the source or that it does not contain (invented details, wrong "
               "names, wrong times, swapped roles).",
               "Give the score from how many claims are unsupported and how serious they are."),
        low="several claims contradict the source or are invented",
        high="every claim is supported by the source"),
    "fluency": Rubric(
        definition="Fluency: is each sentence of the summary well written? Judge grammar, spelling, punctuation, "
                   "word choice and whether the sentences read naturally; the content itself is judged by the other "
                   "criteria.",
        steps=("Read the summary sentence by sentence.",
               "Note grammatical errors, misspellings, broken or run-on sentences, repeated words and phrasing "
               "that a fluent writer would not use.",
               "Give the score from how much these problems get in the way of reading."),
        low="hard to read: frequent errors or fragments",
        high="reads as written by a careful, fluent writer"),
}
assert set(RUBRICS) == set(CRITERIA), "one rubric per judge criterion"

REPLY_FORMAT = ("Reply with exactly two lines and nothing else:\n"
                "Score: <a whole number from 1 to 5>\n"
                "Reason: <one short sentence>")

TEMPLATE = """You will rate a summary of a source text on one criterion.

{definition}

Evaluation steps:
{steps}

Scale: 1 = {low}; 3 = acceptable with clear flaws; 5 = {high}.

Source text:
{source}

Summary:
{summary}

{reply_format}
"""


def prompt_for(criterion: str, source: str, summary: str) -> str:
    """The full prompt asking for `criterion`'s score of `summary` against `source`."""
    rubric = RUBRICS[criterion]
    steps = "\n".join(f"{i}. {step}" for i, step in enumerate(rubric.steps, 1))
    return TEMPLATE.format(definition=rubric.definition, steps=steps, low=rubric.low, high=rubric.high,
                           source=source.strip(), summary=summary.strip(), reply_format=REPLY_FORMAT)
