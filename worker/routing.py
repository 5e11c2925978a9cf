"""Base affinity: one broker queue per base model, and workers read the queues of the bases they hold first.

Routing: a job whose spec names a `model` (fine-tune, generate) goes to `{queue}.base.{slug}`; a score job names no
model (CPU only, nothing to load) and stays on the default queue `{queue}`, which every worker consumes. Each base
queue is added to a Redis set, the queue registry (`Broker.register_queue`): a worker starts consuming every
registered queue, and the first time a queue is registered an `add_consumer` remote-control message reaches the
deployment's live workers at once.

Ordering: kombu's Redis transport pops with one BRPOP over the keys `[queue(:level) for level in priority_steps for
queue in queues]` (`Channel._brpop_start`), so keys go by priority level first and only then by queue order, and the
queue order is whatever the channel's `queue_order_strategy` cycle returns. `AffinityCycle` is kombu's "priority"
cycle (fixed order) with the queues of the loaded bases moved first (the last job's base first), then the default
queue, then the other bases. A job's priority therefore still beats affinity; among equal priorities a worker takes
work for a base it holds before paying for a load.

Needs: a job that needs something of its worker (worker/capabilities.py: CUDA, bf16, bitsandbytes, free GPU memory)
goes to its base queue with the needs appended, `{queue}.base.{slug}.needs-cuda-mem40g`. A worker consumes such a
queue only while it meets its needs (`needs_of_queue`): the registry's `add_consumer` broadcast reaches only the
live workers whose records meet them, and each worker's record thread starts or stops consuming a needs queue as its
capabilities (free memory) change. Affinity is unchanged: a base's needs queues rank with its plain queue.

Idle workers: with nothing waiting, Redis hands a new message to whichever worker has been blocked longest, whatever
it has loaded. Affinity acts on backlogs (sweeps), which is where reloads add up.
"""

from __future__ import annotations

import hashlib
import re

from kombu.utils.scheduling import priority_cycle

from worker.capabilities import Needs, needs_of

NEEDS_MARK = ".needs-"


def base_queue(default_queue: str, model: str) -> str:
    # Queue names must not contain ":" (the transport's priority separator); refs that needed cleaning up or
    # shortening (paths, hub ids) get a hash so two different refs never share a queue. No slug holds NEEDS_MARK, so
    # a plain base queue is never read as one with needs.
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model).replace(NEEDS_MARK, "-needs-").strip("-.")[-48:]
    if slug != model:
        slug = f"{slug}-{hashlib.sha1(model.encode()).hexdigest()[:8]}"
    return f"{default_queue}.base.{slug}"


def route(default_queue: str, spec: dict) -> str:
    """The queue a job with this spec is published to: its base's, with its needs appended when it has any."""
    model = spec.get("model")
    if not model:
        return default_queue
    needs = needs_of(spec)
    return base_queue(default_queue, model) + (NEEDS_MARK + "-".join(needs.tokens()) if needs else "")


def needs_of_queue(queue: str) -> Needs:
    """What a worker must have to consume `queue` (nothing, for the default queue and plain base queues)."""
    return _split_needs(queue)[1]


def _split_needs(queue: str) -> tuple[str, Needs]:
    """(the queue without its needs suffix, the needs it encodes)."""
    plain, mark, suffix = queue.rpartition(NEEDS_MARK)
    needs = Needs.from_tokens(suffix.split("-")) if mark else None
    return (plain, needs) if needs else (queue, Needs())


class AffinityCycle(priority_cycle):
    """kombu queue-order cycle (the `queue_order_strategy` transport option): `preferred` queues first, in order,
    then the rest in consuming order. kombu creates the cycle itself, so the preference is a class attribute set by
    `prefer()`; it is per process, and only a worker process ever sets it."""

    preferred: tuple[str, ...] = ()

    def consume(self, n):
        rank = _NeedsAwareRank({queue: i for i, queue in enumerate(self.preferred)})
        return sorted(self.items[:n], key=lambda queue: rank.get(queue, len(rank)))


def prefer(default_queue: str, loaded: list[str], last: str | None) -> tuple[str, ...]:
    """The default queue first (it holds only score jobs, seconds each, which finish pipelines for the report), then
    the queues of the loaded bases (`last`, the base just used, leading), then the other bases."""
    bases = ([last] if last in loaded else []) + [ref for ref in loaded if ref != last]
    AffinityCycle.preferred = (default_queue,) + tuple(base_queue(default_queue, ref) for ref in bases)
    return AffinityCycle.preferred


class _NeedsAwareRank(dict):
    """A rank lookup where `{base}.needs-...` ranks as `{base}` (a loaded base's needs queues are preferred too)."""

    def get(self, queue, default=None):
        return super().get(_split_needs(queue)[0], default)
