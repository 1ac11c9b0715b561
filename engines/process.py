"""Engine replica processes: spawn them tied to the agent, stop them, find ones left behind.

Every replica process carries the environment variable ``WATTOPS_REPLICA_OF`` set to the
agent's state directory. That lets a restarted agent find replicas a killed agent left
running (by scanning /proc) without trusting any pid file written just before a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

MARKER_ENV = "WATTOPS_REPLICA_OF"
#: Replica logs kept in an agent's log folder (the newest; one per replica started).
LOGS_KEPT = 50
_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    # Resolved once in the parent: the child runs between fork and exec, where only
    # async-signal-safe work is safe in a threaded process (no ldconfig, no dlopen).
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
        return prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def die_with_parent() -> None:
    """For `preexec_fn`: the child gets SIGTERM when its parent dies, kill -9 included.
    Linux only (elsewhere nothing): an agent crash does not leave engines holding memory and
    cores, nor a killed `wattops demo` its agents."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


async def spawn(
    argv: Sequence[str],
    *,
    owner: Path,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    capture_stdout: bool = False,
) -> asyncio.subprocess.Process:
    """Start `argv` (never through a shell) as a replica owned by the agent at `owner`.

    stderr (and stdout unless captured) goes to `log_path`, so a crash's reason can be shown.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env[MARKER_ENV] = str(owner)
    program = argv[0] if argv else ""
    if shutil.which(program, path=full_env.get("PATH")) is None:
        # Said before any log file exists: nothing runs, so nothing is left behind either.
        where = "is not an executable file" if os.sep in program else "was not found on PATH"
        raise FileNotFoundError(
            f"{program!r} {where} (PATH={full_env.get('PATH', '')}): install it, or give its "
            "full path in the deployment's command"
        )
    prune_logs(log_path.parent, keep=LOGS_KEPT)
    with log_path.open("ab") as log:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if capture_stdout else log,
            stderr=log,
            env=full_env,
            preexec_fn=die_with_parent,
            start_new_session=True,
        )


async def terminate(process: asyncio.subprocess.Process, grace_s: float = 5.0) -> None:
    """SIGTERM the process group, then SIGKILL it if it has not exited within `grace_s`."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), grace_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


def prune_logs(folder: Path, keep: int) -> None:
    """Keep the `keep` newest replica logs in `folder`: every restart writes a new one."""
    try:
        logs = sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return
    for old in logs[keep:]:
        with contextlib.suppress(OSError):
            old.unlink()


def tail(path: Path, max_bytes: int = 2000) -> str:
    """The last lines of a replica's log, for error messages."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    lines = data.decode("utf-8", "replace").strip().splitlines()
    return "\n".join(lines[-5:])


def find_orphans(owner: Path, proc_root: Path = Path("/proc")) -> list[int]:
    """Pids of live processes whose environment names `owner` as their agent."""
    needle = f"{MARKER_ENV}={owner}".encode()
    found: list[int] = []
    me = os.getpid()
    for entry in proc_root.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def kill_orphans(owner: Path) -> list[int]:
    """SIGKILL every replica process a previous agent at `owner` left behind."""
    killed = []
    for pid in find_orphans(owner):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed
