"""Loaded by every Python process of `make test-dates` (on its PYTHONPATH): the tests, and the
agents, routers and replicas they start.

libfaketime 0.9.10 (Debian 12's) cannot fake the wall clock under Python 3.11 as it is:
- faking the monotonic clock too (its default) hangs every timed wait of a thread
  (`threading.Event.wait`, `Lock.acquire(timeout=...)`): glibc's `sem_clockwait` reaches the
  kernel with a deadline on the faked clock, days away;
- leaving it alone (`FAKETIME_DONT_FAKE_MONOTONIC=1`, as we run it) breaks `time.sleep`,
  which calls `clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME)`: libfaketime shifts that
  deadline by the offset anyway and the kernel answers EINVAL (libfaketime issue 426, fixed
  after 0.9.10).
So the monotonic clock stays real, and here `time.sleep` waits in `select()`, which libfaketime
leaves alone. Nothing else changes: `time.time()`, `datetime.now()` and the rest read the faked
wall clock, as the tests mean them to.
"""

import os

if "faketime" in os.environ.get("LD_PRELOAD", ""):
    import select
    import time

    def _sleep(seconds: float) -> None:
        if seconds < 0:
            raise ValueError("sleep length must be non-negative")
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            select.select([], [], [], left)

    time.sleep = _sleep
