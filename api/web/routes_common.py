"""What the JSON API's routes share: reading a body by hand (after the token was checked, so a refused request is
401 or 403 whatever its body holds) and describing such a body in /openapi.json."""

from __future__ import annotations

import json

from models.errors import InputError
from models.specs import SPEC_TYPES, Submission

MAX_JOB_BODY = 1024 * 1024  # a job spec is a few lines (a long prompt template at most)


def json_body(raw: bytes, what: str):
    """The body parsed as JSON; InputError naming `what` (and where) otherwise."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} is not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # not UTF-8, a 5000-digit number, deep nesting
        raise InputError(f"{what} cannot be read as JSON: {str(exc)[:120]}") from None


def submission_fields(data: dict) -> dict:
    """`priority` and `max_attempts` taken out of a job or sweep body (null: the default)."""
    popped = {key: data.pop(key, None) for key in Submission.model_fields}
    return {key: value for key, value in popped.items() if value is not None}


def _job_schema(kind: str) -> dict:
    schema = SPEC_TYPES[kind].model_json_schema()
    extra = Submission.model_json_schema()["properties"]
    return {**schema, "title": f"{kind} job", "properties": {**schema["properties"], **extra}}


JOB_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"oneOf": [_job_schema(kind) for kind in SPEC_TYPES], "discriminator": {"propertyName": "kind"}},
    "example": {"kind": "finetune", "name": "lora-a", "model": "tiny-t5", "learning_rate": 0.003,
                "num_train_epochs": 3, "priority": 5}}}}}
