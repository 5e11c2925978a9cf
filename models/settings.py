"""The one typed settings object of tunequeue, read from the environment.

`DATABASE_URL`, `REDIS_URL` and `TUNEQUEUE_HOME` are the settings users change; `TUNEQUEUE_QUEUE` names the Celery
queue (tests use a fresh one per run so that runs never see each other's messages). `TUNEQUEUE_MODEL_CACHE_BYTES`
caps the weights a worker keeps resident (`8GiB`, `500MB` or plain bytes); unset, the cache picks its default.
`TUNEQUEUE_ARTIFACTS` is where adapters, full models and checkpoints are kept (worker/store.py): unset, the folder
TUNEQUEUE_HOME itself; a folder; or any fsspec URL (`s3://bucket/prefix`, `gs://`, `az://` where their fsspec package
is installed). `TUNEQUEUE_ARTIFACT_CACHE_BYTES` caps the worker-local copies of a remote store's files.

Every value is checked when it is read: one that cannot be used is an `InputError` naming its variable (one line,
exit 2 at the CLI), never a traceback from deep inside the first command that uses it. URLs are printed only
through `mask_url`. `JUDGE_BASE_URL` and `JUDGE_API_KEY` are the LLM judge's OpenAI-compatible endpoint and its key;
the key is left out of the repr and of every error message.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from models.errors import InputError

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)(.*)", re.DOTALL)
# Query parameters whose value is a credential, matched anywhere in the name: password, passwd, pass, pwd, secret,
# token, key, access_key, api_key, sslpassword, auth, credentials, signature ...
_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|key|auth|credential|sig", re.IGNORECASE)
# drivername (after postgresql:// became postgresql+psycopg://) → the backend tunequeue runs on
SUPPORTED_DATABASES = {"sqlite": "sqlite", "sqlite+pysqlite": "sqlite", "postgresql+psycopg": "postgresql"}
ECHO_CHARS = 60  # at most this much of a variable's value is echoed in an error


def _split_userinfo(rest: str) -> tuple[str, str]:
    """(userinfo, what follows its '@') of the text after `scheme://`; userinfo is '' when there is none.

    A password may hold an unencoded '@', '/' or '?', so the userinfo runs to the LAST '@' before the host: the last
    '@' before the first '/', '?' or '#' that follows the first '@'."""
    first = rest.find("@")
    user = rest[:first].partition(":")[0]
    # no '@'; or an '@' past the authority (a user name holds no '/', '?' or '#': sqlite:////a@b.db, ?opt=x@y)
    if first < 0 or any(c in user for c in "/?#"):
        return "", rest
    after = rest[first + 1:]
    host_end = min([i for i in (after.find("/"), after.find("?"), after.find("#")) if i >= 0] or [len(after)])
    last = after.rfind("@", 0, host_end)
    cut = first + 1 + last if last >= 0 else first
    return rest[:cut], rest[cut + 1:]


def _mask_query(text: str) -> str:
    """Every query parameter named like a credential gets the value ***; a value runs to the next `&name=` (a
    password may hold an unencoded '&')."""
    head, mark, query = text.partition("?")
    if not mark:
        return text

    def hide(match: re.Match) -> str:
        return match[1] + ("***" if _SECRET_PARAM.search(match[2]) else match[3])

    return head + mark + re.sub(r"((?:^|[&;])([^=&;#]*)=)(.*?)(?=[&;][^=&;#]*=|#|$)", hide, query, flags=re.DOTALL)


def mask_url(url: str) -> str:
    """The URL with every credential replaced by ***, for printing and logs: the password of the userinfo (which
    runs to the last '@' before the host, so a password with an unencoded '@' is hidden whole) and the value of
    every query parameter named like a credential (?password=, ?sslpassword=, ?token=, ?access_key= ...)."""
    match = _SCHEME.fullmatch(url)
    if not match:
        return _mask_query(url)
    scheme, rest = match.groups()
    userinfo, after = _split_userinfo(rest)
    if not userinfo:
        return scheme + _mask_query(rest)
    user, colon, _password = userinfo.partition(":")
    # a user name alone is shown, unless it holds an '@' itself (then part of it is a password: user@pw@host)
    shown = f"{user}:***" if colon else ("***" if "@" in user else user)
    return f"{scheme}{shown}@{_mask_query(after)}"


def _encode_userinfo(url: str) -> str:
    """`postgresql://u:p@ss@host/db` → `postgresql://u:p%40ss@host/db`: an unencoded '@' in the userinfo (the host
    comes after the last '@') is encoded, so the driver receives the password instead of connecting to 'ss@host'."""
    match = _SCHEME.fullmatch(url)
    if not match:
        return url
    scheme, rest = match.groups()
    userinfo, after = _split_userinfo(rest)
    if "@" not in userinfo:
        return url
    return f"{scheme}{userinfo.replace('@', '%40')}@{after}"


def _normalise_database_url(url: str) -> str:
    url = _encode_userinfo(url.strip())
    # SQLAlchemy maps plain postgresql:// to psycopg2; we ship psycopg 3.
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _bad(variable: str, value: str, why: str) -> InputError:
    """`VARIABLE='value': why`, the value masked and cut short."""
    shown = mask_url(value)
    shown = shown if len(shown) <= ECHO_CHARS else shown[:ECHO_CHARS - 3] + "..."
    return InputError(f"{variable}={shown!r}: {why}")


def check_database_url(url: str, variable: str = "DATABASE_URL") -> str:
    """The URL, if SQLAlchemy can parse it and it names a database tunequeue runs on (SQLite, or PostgreSQL through
    psycopg 3); an InputError naming the variable otherwise, before anything tries to connect."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError):
        raise _bad(variable, url, "not a database URL (write sqlite:///PATH or postgresql://USER@HOST/DB)") from None
    backend = SUPPORTED_DATABASES.get(parsed.drivername)
    if backend is None:
        raise _bad(variable, url, f"unsupported database {parsed.drivername[:ECHO_CHARS]!r} (tunequeue runs on "
                                  "sqlite:///PATH or postgresql://USER@HOST/DB)")
    if backend == "sqlite" and (parsed.host or parsed.username or parsed.password or parsed.port):
        raise _bad(variable, url, "a SQLite URL names a file, not a host: sqlite:///relative.db or "
                                  "sqlite:////absolute/path.db")
    return url


# fsspec protocols that are folders on this machine: the store is that folder, read in place
LOCAL_PROTOCOLS = ("file", "local")


def check_artifacts_url(url: str, variable: str = "TUNEQUEUE_ARTIFACTS") -> str:
    """'' (the store is TUNEQUEUE_HOME), an absolute folder, or a URL of an fsspec protocol whose package is
    installed and that names a bucket or folder; an InputError naming the variable otherwise. Nothing is imported
    beyond fsspec's registry and nothing is contacted."""
    url = url.strip()
    if not url:
        return ""
    match = _SCHEME.fullmatch(url)
    if not match:  # a plain folder
        return str(Path(url).expanduser().resolve())
    protocol, rest = match[1][:-3].lower(), match[2]
    if protocol in LOCAL_PROTOCOLS:
        if not rest.strip("/"):
            raise _bad(variable, url, "names no folder")
        return str(Path("/" + rest.lstrip("/")).resolve())
    import importlib.util

    from fsspec.registry import known_implementations, registry

    known = registry.get(protocol) or known_implementations.get(protocol)
    if known is None:
        raise _bad(variable, url, f"unknown scheme {protocol[:20]!r}:// (write a folder, s3://BUCKET/PREFIX, "
                                  "gs://BUCKET/PREFIX or az://CONTAINER/PREFIX)")
    module = known if isinstance(known, type) else known["class"].split(".")[0]
    if not isinstance(module, type) and importlib.util.find_spec(module) is None:
        raise _bad(variable, url, f"the {protocol}:// store needs the Python package {module!r} "
                                  f"(pip install {module})")
    if not _split_userinfo(rest)[1].strip("/"):
        raise _bad(variable, url, "names no bucket or folder")
    return url


def check_notify_url(url: str, variable: str = "TUNEQUEUE_NOTIFY_URL") -> str:
    """An http(s) URL with a host (or '' for none): notifications are JSON POSTs to it."""
    from urllib.parse import urlsplit

    url = url.strip()
    if not url:
        return ""
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
        raise _bad(variable, url, "not an http:// or https:// URL with a host")
    return url


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
MAX_BYTES = 2**60  # an exbibyte: more than any machine holds, far below anything that overflows


def parse_bytes(text: str) -> int:
    """`8GiB`, `500MB`, `1.5gb` or a plain number of bytes, as an int above 0 and at most an exbibyte; an
    InputError (a ValueError) otherwise."""
    match = re.fullmatch(r"\s*(\d{1,30}(?:\.\d{1,30})?)\s*([a-zA-Z]*)\s*", text)
    if not match or match[2].lower() not in _BYTE_UNITS:
        raise InputError(f"not a size: {text[:ECHO_CHARS]!r} (write e.g. 8GiB, 500MB or a number of bytes)")
    value = int(float(match[1]) * _BYTE_UNITS[match[2].lower()])
    if not 0 < value <= MAX_BYTES:
        raise InputError(f"not a size: {text[:ECHO_CHARS]!r} (more than 0 bytes and at most 1024 PiB)")
    return value


def _seconds(env, variable: str, default: float, high: float) -> float:
    """A positive, finite number of seconds, at most `high`, from `env[variable]` (unset or empty: `default`)."""
    raw = env.get(variable)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _bad(variable, raw, "not a number of seconds") from None
    if not (math.isfinite(value) and 0 < value <= high):
        raise _bad(variable, raw, f"must be a number of seconds above 0 and at most {high:g}")
    return value


def _api_key(env, variable: str) -> str:
    """A key sent in an HTTP header: printable, no spaces (an error never echoes it)."""
    key = (env.get(variable) or "").strip()
    if any(not c.isprintable() or c.isspace() for c in key):
        raise InputError(f"{variable} holds spaces or control characters (its value is not shown)")
    return key


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str
    redis_url: str
    queue: str = "tunequeue"
    heartbeat_seconds: float = 10.0  # a running job's row is touched this often
    stale_seconds: float = 60.0  # a running job whose heartbeat is older is taken as lost
    reap_seconds: float = 30.0  # how often each worker runs the reaper
    model_cache_bytes: int | None = None  # None: half the free device memory, on CPU at most 8 GiB
    faults: str = ""  # fault injection for tests and chaos runs (worker/faults.py); empty in normal operation
    notify_url: str = ""  # TUNEQUEUE_NOTIFY_URL: a webhook told when a sweep finishes or a job fails for good
    judge_base_url: str = ""  # JUDGE_BASE_URL: the LLM judge's OpenAI-compatible endpoint, e.g. https://HOST/v1
    judge_api_key: str = field(default="", repr=False)  # JUDGE_API_KEY: sent as a bearer token, never shown
    # TUNEQUEUE_API_EVALUATE=1: the HTTP API accepts `evaluate:` metrics, whose scripts run as code on the workers
    api_evaluate_metrics: bool = False
    artifacts: str = ""  # TUNEQUEUE_ARTIFACTS, checked: '' (the home), a folder, or an fsspec URL
    artifact_cache_bytes: int | None = None  # TUNEQUEUE_ARTIFACT_CACHE_BYTES; None: the store's default
    # TUNEQUEUE_COTRAIN=K: a worker trains up to K compatible queued LoRA points of one sweep in one pass (1: alone)
    cotrain: int = 8

    @classmethod
    def from_env(cls, env: dict | None = None) -> "Settings":
        """The settings of `env` (default: os.environ); a value that cannot be used is an InputError naming its
        variable."""
        env = os.environ if env is None else env
        home = Path(env.get("TUNEQUEUE_HOME") or "./.tunequeue").expanduser().resolve()
        if home.exists() and not home.is_dir():
            raise _bad("TUNEQUEUE_HOME", str(home), "exists and is not a folder")
        database_url = env.get("DATABASE_URL") or f"sqlite:///{home / 'tunequeue.db'}"
        heartbeat = _seconds(env, "TUNEQUEUE_HEARTBEAT_SECONDS", 10.0, high=3600)
        stale = _seconds(env, "TUNEQUEUE_STALE_SECONDS", 60.0, high=7 * 24 * 3600)
        if stale <= heartbeat:
            raise InputError(f"TUNEQUEUE_STALE_SECONDS ({stale:g}) must be more than TUNEQUEUE_HEARTBEAT_SECONDS "
                             f"({heartbeat:g}), or every running job looks lost between two heartbeats")
        artifacts, artifact_cache_bytes = artifact_settings(env)
        return cls(
            home=home,
            database_url=check_database_url(_normalise_database_url(database_url)),
            redis_url=env.get("REDIS_URL") or "redis://127.0.0.1:6379/0",
            queue=env.get("TUNEQUEUE_QUEUE") or "tunequeue",
            heartbeat_seconds=heartbeat,
            stale_seconds=stale,
            reap_seconds=_seconds(env, "TUNEQUEUE_REAP_SECONDS", 30.0, high=24 * 3600),
            model_cache_bytes=_bytes(env, "TUNEQUEUE_MODEL_CACHE_BYTES"),
            faults=env.get("TUNEQUEUE_FAULTS", ""),
            notify_url=check_notify_url(env.get("TUNEQUEUE_NOTIFY_URL") or ""),
            judge_base_url=check_notify_url(env.get("JUDGE_BASE_URL") or "", "JUDGE_BASE_URL"),
            judge_api_key=_api_key(env, "JUDGE_API_KEY"),
            api_evaluate_metrics=_flag(env, "TUNEQUEUE_API_EVALUATE"),
            artifacts=artifacts,
            artifact_cache_bytes=artifact_cache_bytes,
            cotrain=_count(env, "TUNEQUEUE_COTRAIN", 8, high=64),
        )

    @property
    def adapters_dir(self) -> Path:
        return self.home / "adapters"

    @property
    def logs_dir(self) -> Path:
        """Each worker's rotating log, and one log per job under jobs/."""
        return self.home / "logs"

    @property
    def builtin_dir(self) -> Path:
        return self.home / "builtin"

    def resolve(self, relative: str) -> Path:
        """A path stored relative to the home, made absolute."""
        return self.home / relative


def artifact_settings(env=None) -> tuple[str, int | None]:
    """(TUNEQUEUE_ARTIFACTS, TUNEQUEUE_ARTIFACT_CACHE_BYTES) of `env` (default: os.environ), checked."""
    env = os.environ if env is None else env
    return (check_artifacts_url(env.get("TUNEQUEUE_ARTIFACTS") or ""),
            _bytes(env, "TUNEQUEUE_ARTIFACT_CACHE_BYTES"))


def _bytes(env, variable: str) -> int | None:
    """A size in bytes from `env[variable]` (unset or empty: None)."""
    raw = env.get(variable)
    try:
        return parse_bytes(raw) if raw and raw.strip() else None
    except InputError as exc:
        raise InputError(f"{variable}: {exc}") from None


def _count(env, variable: str, default: int, high: int) -> int:
    """A whole number from 1 to `high` from `env[variable]` (unset or empty: `default`)."""
    raw = (env.get(variable) or "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= high:
        raise _bad(variable, raw, f"must be a whole number from 1 to {high}")
    return int(raw)


def _flag(env, variable: str) -> bool:
    value = (env.get(variable) or "").strip().lower()
    if value not in ("", "0", "1", "true", "false", "yes", "no"):
        raise _bad(variable, value, "must be 1 or 0 (true/false, yes/no)")
    return value in ("1", "true", "yes")
