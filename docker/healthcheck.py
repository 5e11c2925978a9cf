"""Health checks of the containers of docker/compose.yml: exit 0 when healthy, else 1 and one line saying why.

    python docker/healthcheck.py url URL     a GET of URL answers 2xx, and not {"ok": false} (API /health, Flower)
    python docker/healthcheck.py worker      a worker of this host (tunequeue-gpuN@HOSTNAME) is live in the registry
"""

from __future__ import annotations

import json
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project, when not installed

TIMEOUT_S = 5


def url_answers(url: str) -> str:
    """'' when a GET of `url` answers 2xx and, if it answers a JSON object with "ok", that is true; else why not."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            body = response.read(64 * 1024)
    except urllib.error.HTTPError as exc:
        return f"{url} answered {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url} did not answer: {getattr(exc, 'reason', exc)}"
    try:
        answer = json.loads(body)
    except ValueError:
        return ""  # not JSON (Flower's "OK"): the status said enough
    if isinstance(answer, dict) and answer.get("ok") is False:
        return f"{url} answered {body.decode(errors='replace')[:300]}"
    return ""


def worker_of_this_host_lives() -> str:
    """'' when the worker registry holds a live worker named ...@<this host name>, else why not."""
    from api.context import AppContext

    host = socket.gethostname()
    try:
        names = [record["hostname"] for record in AppContext().broker.live_workers()]
    except Exception as exc:  # noqa: BLE001 (any failure is unhealthy, said in one line)
        return f"cannot read the worker registry: {exc}"
    if not any(name.endswith("@" + host) for name in names):
        return f"no live worker on host {host} (live: {', '.join(names) or 'none'})"
    return ""


def main(argv: list[str]) -> int:
    if argv[:1] == ["url"] and len(argv) == 2:
        why = url_answers(argv[1])
    elif argv == ["worker"]:
        why = worker_of_this_host_lives()
    else:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    if why:
        print(why, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
