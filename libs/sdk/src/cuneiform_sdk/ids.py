"""UUIDv7 event ids: time-ordered (index-friendly in PostgreSQL), unique without coordination.

Ids made by one process are strictly increasing, even within one millisecond (RFC 9562 §6.2,
method 2: the random part of the previous id is incremented by a random amount), so sorting a
producer's ids sorts its events in the order they were made.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid

_RAND_BITS = 74
_RAND_MAX = (1 << _RAND_BITS) - 1
_lock = threading.Lock()
_last_millis = 0
_last_rand = 0


def _fresh_random() -> int:
    # The top bit stays clear so that many increments within one millisecond fit without overflow.
    return int.from_bytes(os.urandom(10), "big") & (_RAND_MAX >> 1)


def uuid7() -> uuid.UUID:
    """RFC 9562 version 7: 48-bit Unix milliseconds, then 74 random bits (version and variant set)."""
    global _last_millis, _last_rand
    millis = time.time_ns() // 1_000_000
    with _lock:
        if millis > _last_millis:
            rand = _fresh_random()
        else:  # same millisecond (or the clock stepped back): stay monotonic
            millis = _last_millis
            rand = _last_rand + 1 + random.getrandbits(24)
            if rand > _RAND_MAX:  # ~2^49 ids in one millisecond: borrow the next one
                millis += 1
                rand = _fresh_random()
        _last_millis, _last_rand = millis, rand
    rand_a = rand >> 62
    rand_b = rand & ((1 << 62) - 1)
    return uuid.UUID(int=(millis << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b)


def _after_fork_in_child() -> None:
    # A forked child must not continue its parent's sequence: it would make the same next ids.
    global _lock, _last_millis, _last_rand
    _lock = threading.Lock()
    _last_millis = _last_rand = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
