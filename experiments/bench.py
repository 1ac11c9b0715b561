"""`wattops bench`: the published experiment, on this machine, against real agents.

Serving modes run one after another on the same machine, each a real `wattops-agent`
serving the model (SmolLM2-135M-Instruct by default) through real llama.cpp replicas (the
single-stream worker, or llama-server with parallel slots in the batching modes), each sent
the same request stream within a run (`experiments/load.py`'s deterministic open-loop
workload); 5 runs with different seeds. Per mode: energy and cost (from the agent's own
accounting: what it attributes to the deployment), latency, throughput, cache hits, and the
quality of its precision against the base (`wattops.quality`, the table `wattops quality`
prints). The fully optimized mode serves the cheapest precision whose measured quality meets
the floor, chosen before the first run, on llama-server replicas whose slots the agent adapts
(continuous batching); the batching mode is the baseline with that one lever. Results:
`results.json` (every raw figure), `table.md`, `chart.png`.

A (run, mode) that finishes is written to `results.json` at once (atomically); `--resume`
skips what is there, so a multi-hour run that is interrupted loses one mode's work at most.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from wattops.engines.variants import VariantStore
from wattops.experiments.bench_report import summarise, write_chart, write_table
from wattops.experiments.launch import (
    Launched,
    agent_argv,
    free_port,
    launch,
    stop_all,
    stop_on_hangup,
)
from wattops.experiments.load import (
    LoadProfile,
    LoadReport,
    RequestResult,
    build_workload,
    run_load,
)
from wattops.quality import DEFAULT_PRECISIONS, QualityFloor
from wattops.quality import measure as measure_quality
from wattops.quality.command import add_floor_arguments, floor_from_args
from wattops.vocabulary import BUILTIN_SOURCES, atomic_write, cache_dir

__all__ = ["MODES", "BenchSettings", "Mode", "add_arguments", "run_bench", "run_from_args"]


@dataclass(frozen=True)
class Mode:
    """One deployment mode of the experiment."""

    key: str
    title: str
    #: AUTO: the cheapest precision that meets the quality floor (chosen per model).
    precision: str
    response_cache: bool
    prefix_cache: bool
    #: Replicas follow load (HPA's rule) between 1 and the peak need, and park when idle.
    elastic: bool
    #: None: one agent priced as --hardware. "reference": the three-node fleet's reference
    #: node alone (everything to the A100). "routed": the whole fleet behind wattops-router.
    fleet: str | None = None
    #: Replicas are llama-server with `parallel` slots, the slots in use adapted by the agent
    #: (continuous batching); False: the single-stream llama.cpp worker.
    batching: bool = False


AUTO = "auto"

MODES: tuple[Mode, ...] = (
    Mode("baseline", "Baseline", "f16", False, False, False),
    Mode("model_optimized", "Model-optimized", "q4_k_m", False, False, False),
    Mode("fully_optimized", "Fully optimized", AUTO, True, True, True, batching=True),
    Mode("batching", "Batching only", "f16", False, False, False, batching=True),
    Mode("reference", "Reference (A100, f16)", "f16", True, True, True, "reference"),
    Mode("routed", "Routed (3 nodes)", "routed", True, True, True, "routed"),
)
#: The fleet of the routed experiment, as `make demo`'s: (node, hardware profile, precision).
FLEET: tuple[tuple[str, str, str], ...] = (
    ("gpu-a100", "a100-80gb", "f16"),
    ("jetson-orin", "jetson-agx-orin-64gb", "q4_k_m"),
    ("cpu-host", "cpu-generic", "q8_0"),
)
REFERENCE_NODE = "gpu-a100"
#: What `wattops bench` runs unless --modes says otherwise (the routed pair is opt-in).
DEFAULT_MODES = ("baseline", "model_optimized", "fully_optimized", "batching")

#: The default model: `make models/smollm2-135m-instruct.f16.gguf` builds it.
DEFAULT_MODEL = Path("models/smollm2-135m-instruct.f16.gguf")


def default_workload() -> LoadProfile:
    """The documented default request stream of one run (seed and count set per run)."""
    return LoadProfile(
        rate_rps=1.5,
        duration_s=None,
        requests=1000,
        repeat_fraction=0.25,
        zipf_s=1.1,
        burst_factor=2.5,
        burst_every_s=30.0,
        burst_len_s=5.0,
        idle_every_s=60.0,
        idle_len_s=15.0,
        prompt_words=(4, 32),
        max_tokens=(8, 32),
        temperature=0.0,
        shared_prefix_fraction=0.5,
        stream_fraction=1.0,
        prompts="questions",
    )


def quick_workload() -> LoadProfile:
    """`--quick`: the same shape compressed in time, for a smoke run of a few minutes."""
    return replace(
        default_workload(),
        rate_rps=2.0,
        requests=24,
        burst_every_s=6.0,
        burst_len_s=2.0,
        idle_every_s=8.0,
        idle_len_s=4.0,
    )


@dataclass(frozen=True)
class BenchSettings:
    """Everything that decides the figures; `results.json` keeps it for `--resume`."""

    model: Path
    workload: LoadProfile = field(default_factory=default_workload)
    runs: int = 5
    seed: int = 0
    #: Replicas of the fixed modes: the peak need (see README); the elastic mode's ceiling.
    replicas: int = 2
    threads: int = 1
    context: int = 1024
    hardware: str = "cpu-generic"
    site: str = "default"
    sensor: str = "auto"
    idle_scale_to_zero_s: float = 5.0
    autoscale_target_in_flight: float = 1.0
    #: Slots of a batching replica (llama-server --parallel): the most the agent may use.
    parallel: int = 8
    modes: tuple[str, ...] = DEFAULT_MODES
    #: The routed mode's route: its p95 bound (its quality floor is `floor`'s accuracy drop).
    route_max_p95_ms: float = 10_000.0
    #: What the fully optimized mode's precision must keep against the base.
    floor: QualityFloor = field(default_factory=QualityFloor)

    def __post_init__(self) -> None:
        problems = []
        if self.runs < 1:
            problems.append(f"runs must be at least 1, not {self.runs}")
        if self.replicas < 1:
            problems.append(f"replicas must be at least 1, not {self.replicas}")
        if self.threads < 1:
            problems.append(f"threads must be at least 1, not {self.threads}")
        if not 1 <= self.parallel <= 64:
            problems.append(f"parallel must be in 1..64, not {self.parallel}")
        if self.workload.requests is None:
            problems.append("the workload must be bounded by a request count")
        unknown = [m for m in self.modes if m not in {mode.key for mode in MODES}]
        if unknown or not self.modes:
            problems.append(
                f"modes must be a non-empty subset of {', '.join(m.key for m in MODES)}, "
                f"not {', '.join(self.modes) or 'nothing'}"
            )
        if "routed" in self.modes and "reference" not in self.modes:
            problems.append("the routed mode is compared with the reference mode: add reference")
        if problems:
            raise ValueError("; ".join(problems))

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["model"] = str(self.model)
        data["modes"] = list(self.modes)
        return data

    def fingerprint(self) -> str:
        """Identifies the settings (and the model file) a result was measured under."""
        stat = self.model.stat()
        text = json.dumps(
            {**self.as_dict(), "model_file": [stat.st_size, stat.st_mtime_ns]}, sort_keys=True
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- one agent per mode ------------------------------------------------------------------


def agent_config(settings: BenchSettings, mode: Mode, port: int, state_dir: Path,
                 files: dict[str, Path], node: str | None = None, profile: str | None = None,
                 precision: str | None = None) -> str:  # fmt: skip
    """The agent configuration that is `mode` (TOML). Paths are written absolute: the agent
    resolves relative ones against the config file's folder, not the bench's."""
    files_line = ", ".join(f'{p} = "{path.resolve()}"' for p, path in sorted(files.items()))
    # A batching replica takes `parallel` requests at once: the autoscaling target is per slot,
    # so a second replica starts only once the first one's slots are all in use.
    target = settings.autoscale_target_in_flight * (settings.parallel if mode.batching else 1)
    elastic = (
        f"autoscale_target_in_flight = {target}\n"
        f"idle_scale_to_zero_s = {settings.idle_scale_to_zero_s}\n"
        "replicas = 1\n"
        if mode.elastic
        else f"replicas = {settings.replicas}\n"
    )
    batching = (
        f"parallel = {settings.parallel}\nadaptive_parallel = true\nadapt_window_s = 10\n"
        if mode.batching
        else ""
    )
    return f"""\
[agent]
node = "{node or f"bench-{mode.key}"}"
listen = "127.0.0.1:{port}"
state_dir = "{state_dir.resolve()}"
profile = "{profile or settings.hardware}"
sensor = "{settings.sensor}"

[site]
name = "{settings.site}"

[accounting]
window_s = 60

[cache]
enabled = {str(mode.response_cache).lower()}

[[deployments]]
name = "bench"
engine = "{"llamacpp-server" if mode.batching else "llamacpp"}"
model = "{settings.model.resolve()}"
files = {{ {files_line} }}
precision = "{precision or mode.precision}"
max_replicas = {settings.replicas}
threads = {settings.threads}
context = {settings.context}
prefix_cache = {str(mode.prefix_cache).lower()}
{batching}{elastic}"""


def _deployment(node: dict[str, Any]) -> dict[str, Any]:
    return next(d for d in node["deployments"] if d["name"] == "bench")


def _wait_serving(started: Launched, url: str, name: str, log: Path) -> dict[str, Any]:
    """Wait until the agent at `url` serves its deployment at full strength; its snapshot."""
    deadline = time.monotonic() + 300
    while True:
        if started.process.poll() is not None:
            raise RuntimeError(
                f"the {name} agent exited with code {started.process.returncode}; see {log}"
            )
        try:
            node = httpx.get(f"{url}/v1/node", timeout=2).json()
            dep = _deployment(node)
        except (httpx.HTTPError, ValueError, StopIteration):
            dep = None
        if dep is not None:
            held = (dep.get("accounting") or {}).get("cost_usd_per_hour") or 0.0
            # Serving at full strength, and priced (the accounting's first tick has run).
            if (dep["state"] == "serving" and dep["ready_replicas"] >= dep["desired_replicas"]
                    and held > 0):  # fmt: skip
                return dict(node)
            if dep["state"] == "failed":  # it would only retry the same start
                raise RuntimeError(
                    f"the {name} agent cannot start its replicas: {dep['last_error']}; see {log}"
                )
        if time.monotonic() > deadline:
            raise RuntimeError(f"the {name} agent did not serve within 300 s")
        time.sleep(0.25)


@dataclass
class Setup:
    """What one (run, mode) measures: where the load goes, which agents account for it, and
    each agent's price of one held replica per hour (for the routed saving's split)."""

    load_url: str
    agent_urls: list[str]
    replica_usd_per_hour: dict[str, float] = field(default_factory=dict)


def _replica_price(node: dict[str, Any]) -> float:
    dep = _deployment(node)
    held = dep["accounting"]["cost_usd_per_hour"] if dep.get("accounting") else 0.0
    return float(held) / max(int(dep["ready_replicas"]), 1)


@contextmanager
def running_agent(settings: BenchSettings, mode: Mode, work: Path,
                  files: dict[str, Path]) -> Iterator[Setup]:  # fmt: skip
    """Start fresh agents for `mode` (and, routed, a router), wait until they serve, yield
    where to send the load; stop everything at the end."""
    # Fresh means empty: an interrupted attempt at this (run, mode) left its state and its
    # response cache here, and answers cached then would be hits now (`--resume`).
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    nodes: tuple[tuple[str | None, str | None, str | None], ...] = ((None, None, None),)
    if mode.fleet == "reference":
        nodes = tuple(n for n in FLEET if n[0] == REFERENCE_NODE)
    elif mode.fleet == "routed":
        nodes = FLEET
    started: list[Launched] = []
    try:
        setup = Setup("", [])
        for node, profile, precision in nodes:
            port = free_port()
            folder = work / (node or "agent")
            folder.mkdir()
            config = folder / "agent.toml"
            config.write_text(agent_config(settings, mode, port, folder / "state", files, node,
                                           profile, precision))  # fmt: skip
            url = f"http://127.0.0.1:{port}"
            name = f"{mode.key} {node or ''}".strip()
            started.append(launch(f"agent {name}", agent_argv(config), folder / "agent.log"))
            snapshot = _wait_serving(started[-1], url, name, folder / "agent.log")
            setup.agent_urls.append(url)
            setup.replica_usd_per_hour[snapshot["node"]] = _replica_price(snapshot)
        setup.load_url = setup.agent_urls[0]
        if mode.fleet == "routed":
            setup.load_url = _start_router(settings, work, setup.agent_urls, started)
        yield setup
    finally:
        stop_all(started)


def _start_router(settings: BenchSettings, work: Path, agents: list[str],
                  started: list[Launched]) -> str:  # fmt: skip
    """The routed mode's router: route `bench` over the fleet, reference the A100 node, the
    quality floor's accuracy drop and the p95 bound; its URL once it follows every agent."""
    port = free_port()
    lines = [
        "[router]", f'listen = "127.0.0.1:{port}"', f'state_dir = "{(work / "router").resolve()}"',
        f'models_dir = "{settings.model.resolve().parent}"',
        *(f'[[agents]]\nurl = "{url}"' for url in agents),
        "[[routes]]", 'name = "bench"', 'candidates = ["*/bench"]',
        f'reference = "{REFERENCE_NODE}/bench"', 'policy = "cheapest"',
        f"max_accuracy_drop = {settings.floor.max_accuracy_drop}",
        f'accuracy_verdict = "{settings.floor.verdict}"',
        f"max_p95_ms = {settings.route_max_p95_ms}",
    ]  # fmt: skip
    config = work / "router.toml"
    config.write_text("\n".join(lines) + "\n")
    argv = [sys.executable, "-m", "wattops.router.main", "--config", str(config)]
    started.append(launch("router", argv, work / "router.log"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if started[-1].process.poll() is not None:
            raise RuntimeError(f"the router exited; see {work / 'router.log'}")
        try:
            if httpx.get(f"{url}/v1/router", timeout=2).json()["agents_live"] == len(agents):
                return url
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the router did not follow the agents within 60 s; see {work}")


def _counters(urls: list[str]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The agents' node and deployment totals, summed, and each node's deployment."""
    node_totals: dict[str, float] = {}
    dep_totals: dict[str, float] = {}
    per_node: dict[str, Any] = {}
    source = None
    for url in urls:
        node = httpx.get(f"{url}/v1/node", timeout=10).json()
        dep = _deployment(node)
        per_node[node["node"]] = dep
        source = source or dep["accounting"]["energy_source"]
        for key, value in node["totals"].items():
            node_totals[key] = node_totals.get(key, 0.0) + float(value)
        for key, value in dep["accounting"]["totals"].items():
            dep_totals[key] = dep_totals.get(key, 0.0) + float(value)
    deps = list(per_node.values())
    engines = sorted({d["engine"] for d in deps})
    combined = {
        "accounting": {"totals": dep_totals, "energy_source": source},
        "engine": ",".join(engines),
        # One agent's slots; a fleet's are in each node's figures.
        "batching": deps[0].get("batching") if len(deps) == 1 else None,
    }
    return {"totals": node_totals}, combined, per_node


# -- measuring one mode over one run -------------------------------------------------------


def measure(
    settings: BenchSettings,
    mode: Mode,
    run: int,
    setup: Setup,
    on_result: Callable[[RequestResult], None] | None = None,
) -> dict[str, Any]:
    """Send run `run`'s stream where `setup` says; return the raw figures."""
    seed = settings.seed + run
    workload = build_workload(settings.workload, "bench", seed=seed)
    node0, dep0, each0 = _counters(setup.agent_urls)
    started = time.monotonic()
    report = asyncio.run(
        run_load(
            setup.load_url, workload, concurrency_limit=256, on_result=on_result, timeout_s=600
        )
    )
    elapsed = time.monotonic() - started
    # The meter reports every 0.25 s: let the last answers' energy land in the counters.
    time.sleep(1.0)
    node1, dep1, each1 = _counters(setup.agent_urls)
    figures = _figures(mode, run, seed, report, elapsed, node0, dep0, node1, dep1)
    if mode.fleet:
        figures["nodes"] = {
            name: {
                "precision": dep["precision"],
                "cost_usd": _delta(dep["accounting"]["totals"],
                                   each0[name]["accounting"]["totals"], "cost_usd_total"),
                "energy_j": _delta(dep["accounting"]["totals"],
                                   each0[name]["accounting"]["totals"], "energy_j_total"),
                "tokens": sum(_delta(dep["counters"], each0[name]["counters"], k)
                              for k in ("prompt_tokens_total", "completion_tokens_total")),
                "replica_usd_per_hour": setup.replica_usd_per_hour.get(name),
            }
            for name, dep in each1.items()
        }  # fmt: skip
    return figures


def _delta(after: dict[str, Any], before: dict[str, Any], key: str) -> float:
    return float(after[key]) - float(before[key])


def _figures(mode: Mode, run: int, seed: int, report: LoadReport, elapsed: float,
             node0: dict[str, Any], dep0: dict[str, Any], node1: dict[str, Any],
             dep1: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    energy0, energy1 = dep0["accounting"]["totals"], dep1["accounting"]["totals"]
    joules = _delta(energy1, energy0, "energy_j_total")
    estimated = _delta(energy1, energy0, "estimated_energy_j_total")
    cost = _delta(energy1, energy0, "cost_usd_total")
    tokens = report.prompt_tokens + report.completion_tokens
    ok = report.ok

    def per(value: float, count: int, scale: float) -> float | None:
        return value / count * scale if count else None

    return {
        "mode": mode.key,
        "run": run,
        "seed": seed,
        "precision": mode.precision,
        "requests": report.planned,
        "ok": ok,
        "errors": report.error_count,
        # What the failures were (HTTP status or exception kind -> count), to diagnose them.
        "error_kinds": dict(report.errors),
        "dropped": report.dropped,
        "elapsed_s": elapsed,
        "energy_source": dep1["accounting"]["energy_source"],
        "energy_j": joules,
        "energy_estimated_fraction": estimated / joules if joules > 0 else None,
        "node_energy_j": _delta(node1["totals"], node0["totals"], "energy_j_total"),
        "cost_usd": cost,
        "carbon_g": _delta(energy1, energy0, "carbon_g_total"),
        "prompt_tokens": report.prompt_tokens,
        "completion_tokens": report.completion_tokens,
        "cached_prompt_tokens": report.cached_prompt_tokens,
        "tokens": tokens,
        "energy_j_per_1k_requests": per(joules, ok, 1e3),
        "energy_j_per_1m_tokens": per(joules, tokens, 1e6),
        "cost_usd_per_1k_requests": per(cost, ok, 1e3),
        "cost_usd_per_1m_tokens": per(cost, tokens, 1e6),
        "latency_p50_s": report.latency.p50,
        "latency_p95_s": report.latency.p95,
        "latency_p99_s": report.latency.p99,
        "ttft_p50_s": report.ttft.p50,
        "ttft_p95_s": report.ttft.p95,
        "ttft_p99_s": report.ttft.p99,
        "throughput_requests_per_s": ok / elapsed if elapsed > 0 else None,
        "throughput_tokens_per_s": report.completion_tokens / elapsed if elapsed > 0 else None,
        "cache_hit_rate": report.cache_hit_rate or 0.0,
        "prefix_cache_rate": (
            report.cached_prompt_tokens / report.prompt_tokens if report.prompt_tokens else 0.0
        ),
        "send_lag_p99_s": report.send_lag_p99_s,
        "engine": dep1["engine"],
        # Batching modes: the slots per replica the agent had settled on at the end, and why.
        "slots": (dep1.get("batching") or {}).get("slots"),
        "slots_reason": (dep1.get("batching") or {}).get("reason"),
    }


# -- the whole experiment ------------------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "code": code_revision(),
    }


def code_revision() -> str | None:
    """The git commit of the wattops code this process runs (and the agents it starts with
    the same environment), `+changes` when its tree differs; None outside a git checkout."""
    where = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True)  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "-uno", "--",
                                str(where.parent)], capture_output=True, text=True,
                               timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


class Progress:
    """A progress bar on a terminal, one line per finished mode elsewhere."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar: Any = None
        if enabled and sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task("starting", total=total)
        self.enabled = enabled

    def stage(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=text)
        elif self.enabled:
            print(f"wattops bench: {text}", file=sys.stderr, flush=True)

    def advance(self, _: RequestResult | None = None, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Within: this process is the only bench writing into `out` (ValueError otherwise).

    Two benches in one folder would share its variants and work folders and overwrite each
    other's results.json, and both would measure a machine the other keeps busy. The lock is
    the kernel's (flock), so a bench that dies releases it.
    """
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".lock").open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise ValueError(
                f"another wattops bench (pid {holder}) is writing to {out}; wait for it, "
                "or use another --out directory"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        yield


def run_bench(settings: BenchSettings, out: Path, resume: bool = False, command: str = "",
              show_progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Run the experiment into `out`; return the results (also in `out/results.json`)."""
    out = out.resolve()
    with exclusive(out):
        return _run_bench(settings, out, resume, command, show_progress)


def _run_bench(settings: BenchSettings, out: Path, resume: bool, command: str,
               show_progress: bool) -> dict[str, Any]:  # fmt: skip
    results_path = out / "results.json"
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    started_at, resumed_at = now, []
    fingerprint = settings.fingerprint()
    runs: list[dict[str, Any]] = []
    if resume and results_path.exists():
        previous = json.loads(results_path.read_text())
        if previous.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{results_path} was measured with other settings (or another model file); "
                "run without --resume, or into another --out directory"
            )
        runs = list(previous.get("runs", []))
        started_at = previous.get("started_at", now)
        resumed_at = [*previous.get("resumed_at", []), now]
    modes = [m for m in MODES if m.key in settings.modes]
    done = {(r["run"], r["mode"]) for r in runs}
    todo = [(run, mode) for run in range(settings.runs) for mode in modes]
    requests = settings.workload.requests or 0
    progress = Progress(
        sum(requests for run, mode in todo if (run, mode.key) not in done), show_progress
    )
    results: dict[str, Any] = {
        "command": command,
        "fingerprint": fingerprint,
        "machine": machine(),
        "settings": settings.as_dict(),
        "started_at": started_at,
    }
    if resumed_at:
        results["resumed_at"] = resumed_at
    try:
        progress.stage("scoring the precisions against the base (cached per model)")
        modes, files, choice = _prepare(settings, modes, progress.stage)
        quality = choice["table"]["precisions"]
        results["quality"] = quality
        results["precision_choice"] = {k: v for k, v in choice.items() if k != "table"}
        progress.stage(f"fully optimized mode: {choice['why']}")
        todo = [(run, mode) for run in range(settings.runs) for mode in modes]
        for run, mode in todo:
            if (run, mode.key) in done:
                continue
            progress.stage(f"run {run + 1}/{settings.runs} {mode.key}")
            work = out / "work" / f"run{run}-{mode.key}"
            with running_agent(settings, mode, work, files) as setup:
                measured = measure(settings, mode, run, setup, progress.advance)
            # Which code each mode-run measured: a resumed experiment may span commits.
            runs.append({**measured, "code": code_revision()})
            results["runs"] = runs
            results.update(summarise(runs, quality, settings.runs, [m.key for m in modes]))
            _write_json(results_path, results)
    finally:
        progress.close()
    results["runs"] = runs
    results.update(summarise(runs, quality, settings.runs, [m.key for m in modes]))
    results["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write_json(results_path, results)
    write_table(out / "table.md", results)
    write_chart(out / "chart.png", results)
    return results


def _prepare(
    settings: BenchSettings, modes: list[Mode], stage: Callable[[str], None]
) -> tuple[list[Mode], dict[str, Path], dict[str, Any]]:
    """Measure (or read from the cache) the quality table, resolve the fully optimized mode's
    precision with it, and build the variants the modes serve."""
    root = cache_dir()
    fixed = [m.precision for m in modes if m.precision not in (AUTO, "routed")]
    if any(m.fleet == "routed" for m in modes):
        fixed += [precision for _, _, precision in FLEET]
    table = measure_quality(
        settings.model, tuple(dict.fromkeys([*DEFAULT_PRECISIONS, *fixed])), root=root,
        on_stage=stage,
    )  # fmt: skip
    chosen, why = table.cheapest(settings.floor)
    resolved = [replace(m, precision=chosen.precision) if m.precision == AUTO else m for m in modes]
    store = VariantStore(root / "variants")
    files = {
        p: asyncio.run(store.ensure(settings.model, p, os.cpu_count() or 1))
        for p in sorted(set(fixed) | {chosen.precision})
        if p != table.reference
    }
    choice = {
        "floor": asdict(settings.floor),
        "chosen": chosen.precision,
        "why": why,
        "table": table.as_dict(),
    }
    return resolved, files, choice


# -- CLI -----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `wattops bench` arguments."""
    defaults = BenchSettings(model=DEFAULT_MODEL)
    workload = defaults.workload
    parser.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_MODEL,
        help="base GGUF (f16) every mode serves; default: SmolLM2-135M-Instruct "
        f"(`make {DEFAULT_MODEL}`)",
    )
    parser.add_argument(
        "--prompts",
        choices=["questions", "words"],
        default=workload.prompts,
        help="what requests ask: real questions and instructions, or generated word lists "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        help="directory for results.json, table.md and chart.png",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 2 runs of 24 requests, time constants compressed",
    )
    parser.add_argument("--runs", type=int, help=f"runs (default {defaults.runs})")
    parser.add_argument(
        "--requests", type=int, help=f"requests per run (default {workload.requests})"
    )
    parser.add_argument(
        "--rate", type=float, help=f"mean arrival rate, req/s (default {workload.rate_rps})"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of run 1 (run k: seed + k - 1)")
    parser.add_argument(
        "--replicas",
        type=int,
        default=defaults.replicas,
        help="replicas of the fixed modes, the peak need (default %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=defaults.threads,
        help="CPU threads per replica (default %(default)s)",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=defaults.parallel,
        help="slots of a batching replica (llama-server --parallel), the most the agent's "
        "adaptive batching may use (default %(default)s)",
    )
    parser.add_argument(
        "--hardware",
        default=defaults.hardware,
        help="hardware profile the agents price with (default %(default)s)",
    )
    parser.add_argument("--site", default=defaults.site, help="site profile (default %(default)s)")
    parser.add_argument(
        "--sensor",
        default=defaults.sensor,
        choices=["auto", *BUILTIN_SOURCES],
        help="power sensor of the agents (default %(default)s)",
    )
    parser.add_argument(
        "--modes",
        default=",".join(defaults.modes),
        help=f"comma-separated modes of {', '.join(m.key for m in MODES)} (default: "
        f"{','.join(DEFAULT_MODES)}; routed brings reference along: it is compared with it)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the (run, mode) results already in --out and run the rest",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    add_floor_arguments(parser)


def _modes(text: str) -> tuple[str, ...]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if "routed" in modes and "reference" not in modes:
        modes.insert(modes.index("routed"), "reference")
    return tuple(modes)


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """Validated settings; ValueError names what is wrong."""
    workload = quick_workload() if args.quick else default_workload()
    if args.requests is not None:
        workload = replace(workload, requests=args.requests)
    if args.rate is not None:
        workload = replace(workload, rate_rps=args.rate)
    workload = replace(workload, prompts=args.prompts)
    runs = args.runs if args.runs is not None else (2 if args.quick else 5)
    if not args.model.is_file():
        raise ValueError(
            f"--model {args.model}: no such file (make {DEFAULT_MODEL} builds the default)"
        )
    return BenchSettings(
        model=args.model,
        workload=workload,
        runs=runs,
        seed=args.seed,
        replicas=args.replicas,
        threads=args.threads,
        parallel=args.parallel,
        hardware=args.hardware,
        site=args.site,
        sensor=args.sensor,
        idle_scale_to_zero_s=2.0 if args.quick else BenchSettings.idle_scale_to_zero_s,
        modes=_modes(args.modes),
        floor=floor_from_args(args),
    )


def run_from_args(args: argparse.Namespace) -> int:
    """`wattops bench`: exit 0 when every request of every mode was answered, 1 otherwise."""
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"wattops bench: {exc}", file=sys.stderr)
        return 2
    command = "wattops bench " + " ".join(sys.argv[2:])
    try:
        with stop_on_hangup():
            results = run_bench(settings, args.out, args.resume, command, not args.quiet)
    except ValueError as exc:
        print(f"wattops bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"wattops bench: interrupted; --resume continues from {args.out}", file=sys.stderr)
        return 130
    print((args.out / "table.md").read_text())
    print(f"wattops bench: results in {args.out}/ (results.json, table.md, chart.png)")
    failed = sum(r["errors"] + r["dropped"] for r in results["runs"])
    if failed:
        print(f"wattops bench: {failed} requests failed or were dropped", file=sys.stderr)
    return 1 if failed else 0
