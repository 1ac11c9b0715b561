"""Start local agents (and helpers) as child processes and stop them all, whatever happens.

Shared by `wattops demo` and `wattops bench`, which both run real agents on this machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from wattops.engines.process import die_with_parent

__all__ = ["Launched", "agent_argv", "free_port", "launch", "stop_all", "stop_on_hangup"]


@dataclass
class Launched:
    """A process we started; `stop_all` stops it at the end."""

    name: str
    process: subprocess.Popen[bytes]


def free_port() -> int:
    """A TCP port free on loopback now (the caller binds it soon after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def agent_argv(config: Path) -> list[str]:
    """The command line of an agent with `config`, in this interpreter."""
    return [sys.executable, "-m", "wattops.agents.main", "--config", str(config)]


def launch(name: str, argv: list[str], log: Path) -> Launched:
    """Start `argv` with its output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        # Its own session: a Ctrl-C in the terminal reaches the launcher, which then stops
        # each child in order, rather than every child at once. And tied to the launcher's
        # life: killed with SIGKILL (no chance to stop them), it still takes them along.
        proc = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=die_with_parent)  # fmt: skip
    return Launched(name, proc)


def stop_all(started: list[Launched], grace_s: float = 20.0) -> None:
    """TERM each process group (last started first), then KILL what is left after `grace_s`."""
    for item in reversed(started):
        if item.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(item.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for item in reversed(started):
        try:
            item.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(item.process.pid, signal.SIGKILL)
            item.process.wait()


@contextlib.contextmanager
def stop_on_hangup() -> Iterator[None]:
    """Within: SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does.

    Python's default for both ends the process at once, skipping every `finally`, so the
    agents a launcher started would outlive it. This way they are stopped the same way as
    after a Ctrl-C (ssh hung up, `kill`, a CI timeout).
    """

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
