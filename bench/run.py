"""Benchmarks of the provider's costs, each against a baseline run side by side in the same invocation.

    python bench/run.py                 # every case, about 10 minutes on a 2-core machine
    python bench/run.py triggerer       # N = 100 (and the baseline), 1,000, 5,000, 10,000, 20,000 batched: ~6 min
    python bench/run.py polls parse     # some cases
    BENCH_TRIGGER_SIZES=1000 BENCH_BATCH_SIZES= python bench/run.py triggerer   # fewer triggerer sizes
    BENCH_OLD_CHECKOUT=/path/to/old/tree python bench/run.py triggerer   # and that tree's client beside it
    BENCH_ROUNDS=3 BENCH_OLD_CHECKOUT=/path/to/old/tree python bench/run.py triggerer   # in rounds, medians

Cases: ``triggerer`` (N triggers on one event loop, single GETs and batch polling; the machine and the
client-per-poll baseline's CPU per poll printed with every figure), ``polls`` (adaptive
schedule vs a fixed 10 s interval), ``parse`` (import and construction cost in DAG files), ``download``
(a 500 MB result streamed to disk), ``submit`` (1,000 submissions through one hook vs a new session per
call, over HTTPS and plain HTTP). The simulator runs in its own process so that its CPU does not count
against the provider's.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

# Before Airflow is imported: the triggers' progress lines (one per poll) would flood the figures.
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")

API_KEY = "sk-sim-bench-0000000000"
#: The same simulator through a connection with the (observed-endpoint) batch polling option on.
BATCH_CONN = "evolink_batch"
#: Triggers in the side-by-side CPU comparison (the client-per-poll baseline spends ~20 ms of CPU per poll);
#: the provider's run of it is also the N=100 figure.
BASELINE_TRIGGERS = 100
REPO = Path(__file__).resolve().parent.parent
#: A tree holding an earlier ``evolink_provider`` (a ``git archive`` of an older commit, say): its triggers
#: run beside this tree's at every size, in the same invocation, for a side-by-side comparison.
OLD_CHECKOUT = os.environ.get("BENCH_OLD_CHECKOUT", "")


def in_checkout(checkout: str, *args: str) -> dict[str, Any]:
    """``args`` run by this script in a child process that imports ``evolink_provider`` from ``checkout``
    (the child prints its result as its last line of JSON)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [checkout, os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(f"child run {args} in {checkout} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def simulator(task_seconds: float = 5.0, tls: bool = False) -> Iterator[str]:
    """The simulator in a child process; the connection env var points at it.

    With ``tls``, the simulator serves HTTPS and ``REQUESTS_CA_BUNDLE`` names certifi's bundle plus the
    simulator's certificate, so a new ``requests`` session pays what it pays against the real API: the
    handshake and the loading of the full CA bundle.
    """
    port = free_port()
    command = [sys.executable, "-m", "evolink_provider.simulator", "--port", str(port), "--api-key", API_KEY]
    command += ["--task-seconds", str(task_seconds), "--credits", "1e9"] + (["--tls"] if tls else [])
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    url = process.stdout.readline().split()[-1]  # "EvoLink simulator listening on <url>"
    bundle = None
    if tls:
        import certifi

        certificate = Path(process.stdout.readline().split()[-1]).read_text()
        with tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False) as file:
            file.write(Path(certifi.where()).read_text() + "\n" + certificate)
        bundle = file.name
        os.environ["REQUESTS_CA_BUNDLE"] = bundle
    for conn_id, extra in (("EVOLINK_DEFAULT", {}), (BATCH_CONN.upper(), {"batch_polling": True})):
        os.environ[f"AIRFLOW_CONN_{conn_id}"] = json.dumps(
            {"conn_type": "evolink", "password": API_KEY, "host": url, "extra": {"read_timeout": 30, **extra}}
        )
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        if bundle is not None:
            os.environ.pop("REQUESTS_CA_BUNDLE", None)
            os.unlink(bundle)


def stats(url: str) -> dict[str, Any]:
    return dict(requests.get(f"{url}/_simulator/stats", timeout=10).json())


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


# -- 1. triggerer scale -----------------------------------------------------------------------------


async def _lag_probe(
    stop: asyncio.Event, lags: list[float], own_lags: list[float], period: float = 0.05
) -> None:
    """Event-loop lag every ``period``; ``own_lags`` caps each at the CPU the loop's thread spent meanwhile,
    the part its own work can explain (on a shared machine the rest is time the OS gave to others)."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        start, cpu = loop.time(), time.thread_time()
        await asyncio.sleep(period)
        lag = loop.time() - start - period
        lags.append(lag)
        own_lags.append(min(lag, time.thread_time() - cpu))


async def _baseline_wait(url: str, task_id: str, poll_interval: float) -> None:
    """The pattern many providers use: a new HTTP client (and TCP connection) for every poll."""
    import httpx

    while True:
        async with httpx.AsyncClient(timeout=30) as client:
            answer = (
                await client.get(f"{url}/v1/tasks/{task_id}", headers={"Authorization": f"Bearer {API_KEY}"})
            ).json()
        if answer["status"] in ("completed", "failed"):
            return
        await asyncio.sleep(poll_interval)


async def _aiohttp_wait(session: Any, url: str, task_id: str, first_poll_at: float) -> None:
    """The provider's poll schedule, turns included, on a bare shared ``aiohttp`` session (no provider
    client code): what aiohttp itself costs the loop at this scale, beside the provider's client."""
    from evolink_provider.polling import decide_after_poll, poll_turn

    headers = {"Authorization": f"Bearer {API_KEY}"}
    started_at = time.time()
    if first_poll_at > time.time():
        await poll_turn(first_poll_at)
    while True:
        async with session.get(f"{url}/v1/tasks/{task_id}", headers=headers) as response:
            answer = json.loads(await response.read())
        if answer["status"] in ("completed", "failed"):
            return
        now = time.time()
        await poll_turn(now + decide_after_poll(answer, now=now, started_at=started_at, deadline=None).delay)


#: Tasks finish at random times this many seconds after the wait begins.
TASK_FINISH_WINDOW = (10.0, 30.0)
#: Submissions per second the bench assumes when it schedules the tasks' end (measured: ~600/s).
ASSUMED_SUBMIT_RATE = 450


def run_triggers(
    url: str, count: int, baseline: bool, conn_id: str = "evolink_default", bare_aiohttp: bool = False
) -> dict[str, float]:
    """N triggers, with the provider's default poll settings, on one fresh event loop in this process
    (``bare_aiohttp``: the same schedule on a bare aiohttp session instead of the provider's triggers)."""
    from evolink_provider.hooks.evolink import EvolinkHook
    from evolink_provider.hooks.transport import aclose_async_clients
    from evolink_provider.polling import DEFAULT_POLL_INTERVAL, decide_after_poll
    from evolink_provider.triggers.evolink import EvolinkTaskTrigger

    # A fresh simulator state: earlier runs' statistics would otherwise sit in this process's heap.
    requests.post(f"{url}/_simulator/reset", timeout=30).raise_for_status()
    hook = EvolinkHook()
    # Polled to completion by the same client before the measured window (see there).
    warm_up_id = hook.create_video_task(
        {"model": "seedance-2.0-fast-text-to-video", "prompt": "bench warm-up [sim:seconds=0.01]"}
    )["id"]
    ids, first_polls, done_at = [], [], []
    # Submitting thousands of tasks takes seconds: schedule every task's end after the wait begins.
    wait_begins = time.time() + 1.0 + count / ASSUMED_SUBMIT_RATE
    for _ in range(count):
        submitted = time.time()
        seconds = max(0.0, wait_begins - submitted) + random.uniform(*TASK_FINISH_WINDOW)
        prompt = f"bench [sim:seconds={seconds:.2f}] [sim:estimate={round(seconds)}]"
        task = hook.create_video_task({"model": "seedance-2.0-fast-text-to-video", "prompt": prompt})
        ids.append(task["id"])
        done_at.append(submitted + seconds)
        # As the operator does before deferring: the first poll follows the schedule, not "at once".
        now = time.time()
        first_polls.append(now + decide_after_poll(task, now=now, started_at=now, deadline=None).delay)
    hook.close()

    async def wait_for_all(
        task_ids: list[str], first_poll_at: list[float], fired_at: dict[str, float]
    ) -> None:
        if baseline:

            async def wait(task_id: str) -> None:
                await _baseline_wait(url, task_id, DEFAULT_POLL_INTERVAL)
                fired_at[task_id] = time.time()

            await asyncio.gather(*(wait(task_id) for task_id in task_ids))
        elif bare_aiohttp:  # this tree only: an old tree's child never takes this branch
            import aiohttp

            from evolink_provider.hooks.transport import CONNECTIONS_PER_ORIGIN

            connector = aiohttp.TCPConnector(
                limit=0, limit_per_host=CONNECTIONS_PER_ORIGIN, keepalive_timeout=45
            )
            async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:

                async def bare(task_id: str, first: float) -> None:
                    await _aiohttp_wait(session, url, task_id, first)
                    fired_at[task_id] = time.time()

                await asyncio.gather(
                    *(bare(t, first) for t, first in zip(task_ids, first_poll_at, strict=True))
                )
        else:

            async def first_event(trigger: EvolinkTaskTrigger) -> None:
                # To its end, as the triggerer reads a trigger: one left at its event would be closed by
                # asyncio's finalizer hook (a write to the loop's self-pipe per generator).
                async for event in trigger.run():
                    if event.payload.get("status") == "success":
                        fired_at.setdefault(trigger.evolink_task_id, time.time())

            triggers = [
                EvolinkTaskTrigger(task_id, conn_id, first_poll_at=first)
                for task_id, first in zip(task_ids, first_poll_at, strict=True)
            ]
            await asyncio.gather(*(first_event(t) for t in triggers))
            await aclose_async_clients()

    # The window measures a triggerer that has run for a while: the client's lazy imports (aiohttp's are
    # thousands of objects that outlive every collection) done by a first trigger, and no start-up garbage
    # left to promote. That one-time cost is measured by itself (docs/benchmarks.md, fifth pass).
    gc.collect()
    objects_before_warm_up = len(gc.get_objects())
    asyncio.run(wait_for_all([warm_up_id], [time.time()], {}))
    if time.time() > wait_begins:
        print(f"  (submitting {count} tasks overran the schedule by {time.time() - wait_begins:.1f} s)")
    time.sleep(max(0.0, wait_begins - time.time()))
    before = stats(url)
    gc.collect()
    first_trigger_objects = len(gc.get_objects()) - objects_before_warm_up

    lags: list[float] = []
    own_lags: list[float] = []

    async def main() -> dict[str, float]:
        stop, fired_at = asyncio.Event(), dict[str, float]()
        probe = asyncio.create_task(_lag_probe(stop, lags, own_lags))
        await wait_for_all(ids, first_polls, fired_at)
        stop.set()
        await probe
        return fired_at

    pauses: list[float] = []
    collection_started = [0.0]

    def on_collection(phase: str, info: dict[str, int]) -> None:
        if info["generation"] == 2:
            if phase == "start":
                collection_started[0] = time.perf_counter()
            else:
                pauses.append(time.perf_counter() - collection_started[0])

    gc.callbacks.append(on_collection)
    times = os.times()
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        fired_at = asyncio.run(main())
    finally:
        gc.callbacks.remove(on_collection)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    kernel = os.times().system - times.system
    after = stats(url)
    # A poll is one task read; in batch mode one API call reads up to 50 tasks.
    polls = sum(after["polls_by_task"].get(task_id, 0) for task_id in ids)
    calls = sum(
        after["requests"].get(label, 0) - before["requests"].get(label, 0)
        for label in ("GET /v1/tasks", "POST /v1/tasks/batch")
    )
    late = [
        fired_at[task_id] - done for task_id, done in zip(ids, done_at, strict=True) if task_id in fired_at
    ]
    return {
        "n": count,
        "fired": len(fired_at),
        "polls": polls,
        "polls_per_task": polls / count,
        "calls_per_task": calls / count,
        "cpu_s": cpu,
        "cpu_ms_per_poll": 1000 * cpu / max(polls, 1),
        # In the kernel (sockets, epoll): what no Python code of the provider can make cheaper.
        "kernel_share": kernel / max(cpu, 1e-9),
        "lag_p99_ms": 1000 * percentile(lags, 0.99),
        "own_lag_p99_ms": 1000 * percentile(own_lags, 0.99),
        "load": os.getloadavg()[0],
        # Less one: the connection of the stats request that reads the count.
        "connections": after["connections_opened"] - before["connections_opened"] - 1,
        "late_p95_s": percentile(late, 0.95),
        "wall_s": wall,
        "full_collections": len(pauses),
        "full_collection_max_ms": 1000 * max(pauses, default=0.0),
        "lags_over_100ms": sum(lag > 0.1 for lag in lags),
        # What the first trigger of a process leaves for good (the client's lazy imports, its caches).
        "first_trigger_objects": first_trigger_objects,
    }


TRIGGER_LINE = (
    "triggerer N={n} {mode}: fired {fired}/{n}, loop lag p99 {lag_p99_ms:.1f} ms (own CPU {own_lag_p99_ms:.1f} ms; "
    "load average {load:.1f}), connections {connections}, "
    "polls/task {polls_per_task:.2f}, API calls/task {calls_per_task:.2f}, CPU {cpu_ms_per_poll:.3f} ms/poll "
    "({kernel_share:.0%} in the kernel), "
    "completion noticed p95 {late_p95_s:.1f} s late, wall {wall_s:.0f} s, {full_collections} full collections "
    "(longest {full_collection_max_ms:.0f} ms), {lags_over_100ms} lag samples over 100 ms"
)
#: Issue 16: CPU per single-GET poll at most this, and at most this share of the baseline's in the same run.
CPU_TARGET_MS = 0.5
CPU_TARGET_SHARE = 1 / 40
LAG_TARGET_MS = 100.0
#: Completion is noticed within max(5 s, 5 % of the run time) at p95 (tasks here run 10-30 s).
DETECTION_BOUND_S = 5.0


def machine() -> str:
    """The CPU model and core count (from /proc/cpuinfo), so figures can be compared across machines."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"unknown CPU, {os.cpu_count()} cores"
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{models[0] if models else 'unknown CPU'}, {len(models) or os.cpu_count()} cores"


#: Rounds of the side-by-side comparison (``BENCH_ROUNDS``): full collections come 0-3 times per run and
#: the baseline's CPU per poll moves by a third between runs, so one run cannot tell two clients apart.
ROUNDS = max(1, int(os.environ.get("BENCH_ROUNDS", "1")))


def bench_triggerer() -> list[str]:
    from evolink_provider.hooks.transport import CONNECTIONS_PER_ORIGIN as ASYNC_POOL_SIZE

    lines = [f"triggerer machine: {machine()}"]
    sizes = [int(n) for n in os.environ.get("BENCH_TRIGGER_SIZES", "1000,5000,10000").split(",") if n]
    batch_sizes = [int(n) for n in os.environ.get("BENCH_BATCH_SIZES", "20000").split(",") if n]
    # Beside an old tree, each client runs in a fresh child process: in this process the earlier runs'
    # heap would change how often the full collections come.
    clients: dict[str, Callable[[str, int], dict[str, float]]] = {
        "provider": lambda url, n: (
            in_checkout(str(REPO), "_triggers", url, str(n))
            if OLD_CHECKOUT
            else run_triggers(url, n, baseline=False)
        )
    }
    if OLD_CHECKOUT:
        clients[f"old client ({OLD_CHECKOUT})"] = lambda url, n: in_checkout(
            OLD_CHECKOUT, "_triggers", url, str(n)
        )
        clients["bare aiohttp, same schedule"] = lambda url, n: in_checkout(
            str(REPO), "_aiohttp", url, str(n)
        )
    # runs[count][client]: one result per round, each with its round's baseline CPU per poll.
    runs: dict[int, dict[str, list[dict[str, float]]]] = {n: {name: [] for name in clients} for n in sizes}
    with simulator() as url:
        for round_number in range(ROUNDS):
            base = run_triggers(url, BASELINE_TRIGGERS, baseline=True)
            ours = run_triggers(url, BASELINE_TRIGGERS, baseline=False)
            heading = f"round {round_number + 1}/{ROUNDS}: " if ROUNDS > 1 else ""
            for result, mode in ((base, "baseline (client per poll)"), (ours, "provider")):
                lines.append(heading + TRIGGER_LINE.format(mode=mode, **result))
            names = list(clients)
            order = names[round_number % len(names) :] + names[: round_number % len(names)]  # no fixed slot
            for count in sizes:
                for name in order:
                    result = {**clients[name](url, count), "baseline_ms": base["cpu_ms_per_poll"]}
                    runs[count][name].append(result)
                    line = heading + TRIGGER_LINE.format(mode=name, **result) + _verdict(result)
                    if name == "provider":
                        within = result["connections"] <= ASYNC_POOL_SIZE
                        line += f" (pool {ASYNC_POOL_SIZE}: {'within' if within else 'OVER'})"
                    lines.append(line)
        for count in sizes:
            lines += _side_by_side(count, runs[count])
        for count in batch_sizes:
            batched = run_triggers(url, count, baseline=False, conn_id=BATCH_CONN)
            batched["baseline_ms"] = base["cpu_ms_per_poll"]  # the last round's
            line = TRIGGER_LINE.format(mode="batch_polling", **batched) + _verdict(batched, single_get=False)
            if sizes:
                largest = runs[max(sizes)]["provider"][-1]
                cut = largest["calls_per_task"] / max(batched["calls_per_task"], 1e-9)
                line += f"; API calls per task {cut:.1f}x fewer than single GETs at N={max(sizes)}"
            lines.append(line)
    return lines


def _verdict(result: dict[str, float], single_get: bool = True) -> str:
    """The goals one run meets: CPU per poll against its round's baseline, loop lag, completion noticed."""
    share = result["cpu_ms_per_poll"] / result["baseline_ms"]
    text = f"; baseline {result['baseline_ms']:.2f} ms/poll in this round, ratio {share:.3f}"
    if single_get:
        cpu_ok = result["cpu_ms_per_poll"] <= CPU_TARGET_MS and share <= CPU_TARGET_SHARE
        text += f" (CPU target <= {CPU_TARGET_MS} ms and <= 1/40: {'met' if cpu_ok else 'MISSED'})"
    lag_ok = result["lag_p99_ms"] < LAG_TARGET_MS
    late_ok = result["late_p95_s"] <= DETECTION_BOUND_S and result["fired"] == result["n"]
    return text + (
        f"; lag p99 < {LAG_TARGET_MS:.0f} ms: {'met' if lag_ok else 'MISSED'}"
        f"; all fired and noticed within {DETECTION_BOUND_S:.0f} s at p95: {'met' if late_ok else 'MISSED'}"
    )


def _side_by_side(count: int, runs: dict[str, list[dict[str, float]]]) -> list[str]:
    """Each client over the rounds at one N: median CPU ratio and lag p99, full collections in all; then
    whether this tree's client is within 1/40 of the baseline and no worse than the old one."""
    summary: dict[str, dict[str, float]] = {}
    lines = []
    for name, results in runs.items():
        summary[name] = {
            "ratio": statistics.median(r["cpu_ms_per_poll"] / r["baseline_ms"] for r in results),
            "cpu_ms": statistics.median(r["cpu_ms_per_poll"] for r in results),
            "lag_ms": statistics.median(r["lag_p99_ms"] for r in results),
            "full": sum(r["full_collections"] for r in results),
        }
        lines.append(
            f"N={count} {name} over {len(results)} round(s): CPU {summary[name]['cpu_ms']:.3f} ms/poll, "
            f"ratio {summary[name]['ratio']:.4f} (medians), lag p99 {summary[name]['lag_ms']:.1f} ms (median), "
            f"{summary[name]['full']:.0f} full collections in all; the first trigger of a process left "
            f"{results[0]['first_trigger_objects']:.0f} objects for good"
        )
    ours = summary["provider"]
    verdict = f"N={count} provider: CPU within 1/40 of the baseline (median): {'met' if ours['ratio'] <= CPU_TARGET_SHARE else 'MISSED'}"
    old = next((value for name, value in summary.items() if name.startswith("old client")), None)
    if old is not None:
        # At the 0.1 ms the figures are printed to: the probe's sleeps wake on whole-millisecond epoll
        # timeouts, so hundredths between two medians are not a difference the bench can see.
        no_worse = round(ours["lag_ms"], 1) <= round(old["lag_ms"], 1) and ours["full"] <= old["full"]
        verdict += f"; lag p99 and full collections no worse than the old client's: {'met' if no_worse else 'MISSED'}"
    return [*lines, verdict]


# -- 2. polls per video -----------------------------------------------------------------------------


def simulate_schedule(estimate: float, run_time: float, rng: random.Random) -> tuple[int, float]:
    """Polls until completion is seen, and how late, for a task whose progress rises linearly."""
    from evolink_provider.polling import Outcome, decide_after_poll

    now, polls = 0.0, 0
    task: dict[str, Any] = {
        "id": "t",
        "status": "pending",
        "progress": 0,
        "task_info": {"estimated_time": estimate},
    }
    while True:
        decision = decide_after_poll(task, now=now, started_at=0.0, deadline=None)
        if decision.outcome is not Outcome.WAIT:
            return polls, now - run_time
        now += decision.delay
        polls += 1
        if now >= run_time:
            task = {"id": "t", "status": "completed", "progress": 100, "results": ["u"]}
        else:
            progress = int(100 * now / run_time)
            task = {
                "id": "t",
                "status": "processing",
                "progress": progress,
                "task_info": {"estimated_time": estimate},
            }


def bench_polls() -> list[str]:
    rng = random.Random(7)
    lines = []
    for estimate in (165, 2400):
        polls, lateness, allowed, fixed = [], [], [], []
        for _ in range(2000):
            run_time = estimate * rng.uniform(0.7, 1.3)
            count, late = simulate_schedule(estimate, run_time, rng)
            polls.append(count)
            lateness.append(late)
            allowed.append(max(5.0, 0.05 * run_time))
            fixed.append(-(-run_time // 10))
        within = sum(late <= bound for late, bound in zip(lateness, allowed, strict=True)) / len(lateness)
        lines.append(
            f"polls estimated_time={estimate}s (run time 0.7-1.3x): mean {statistics.mean(polls):.1f} polls vs "
            f"{statistics.mean(fixed):.1f} at a fixed 10 s, ratio {statistics.mean(polls) / statistics.mean(fixed):.3f} "
            f"(target <= 0.25); detection p95 {percentile(lateness, 0.95):.1f} s, within max(5 s, 5%) for "
            f"{100 * within:.1f}% (target >= 95%)"
        )
    return lines


# -- 3. DAG parse cost ------------------------------------------------------------------------------


def _import_ms(statement: str) -> float:
    code = f"import time; import airflow.sdk; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return 1000 * float(output.strip().splitlines()[-1])


def bench_parse() -> list[str]:
    runs = 7
    ours = statistics.median(_import_ms("import evolink_provider.operators.evolink") for _ in range(runs))
    baseline = statistics.median(_import_ms("pass") for _ in range(runs))
    code = (
        "import time, pendulum\n"
        "from airflow.sdk import DAG\n"
        "from evolink_provider.operators.evolink import EvolinkSeedanceTextToVideoOperator as Op\n"
        "t = time.perf_counter()\n"
        "with DAG('bench', schedule=None, start_date=pendulum.datetime(2026, 1, 1)):\n"
        "    [Op(task_id=f't{i}', prompt='p', duration=5) for i in range(1000)]\n"
        "print(time.perf_counter() - t)\n"
    )
    build = float(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    return [
        f"parse: importing the operators module adds {ours - baseline:.1f} ms over `import airflow.sdk` "
        f"(median of {runs} fresh interpreters; target <= 50 ms)",
        f"parse: constructing 1,000 operators in a DAG takes {build:.2f} s (target < 1 s)",
    ]


# -- 4. streaming download --------------------------------------------------------------------------

DOWNLOAD_SCRIPT = """
import json, shutil, sys, tempfile, time
import requests
mode, url, folder = sys.argv[1:4]
from evolink_provider.hooks.evolink import EvolinkHook
from evolink_provider.storage import store_results
hook = EvolinkHook(); hook.settings; hook.session
def status_kb(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # reset the peak (VmHWM) to the current RSS, so imports' peak does not hide growth
before = status_kb("VmRSS:")
start = time.perf_counter()
if mode == "provider":
    store_results(hook, {"id": "task-unified-1-bench000", "results": [url]}, folder)
else:
    with requests.get(url, stream=True) as response, open(folder + "/plain.mp4", "wb") as sink:
        shutil.copyfileobj(response.raw, sink, 1 << 20)
elapsed = time.perf_counter() - start
print(json.dumps({"seconds": elapsed, "rss_growth_mb": (status_kb("VmHWM:") - before) / 1024}))
"""


def bench_download() -> list[str]:
    size = 500 * 1024 * 1024
    results: dict[str, list[dict[str, float]]] = {"provider": [], "plain": []}
    with simulator() as url, tempfile.TemporaryDirectory() as folder:
        blob = f"{url}/media/blob/{size}.mp4"
        for _ in range(2):
            for mode in ("plain", "provider"):
                for leftover in Path(folder).iterdir():
                    leftover.unlink()
                output = subprocess.run(
                    [sys.executable, "-c", DOWNLOAD_SCRIPT, mode, blob, folder],
                    capture_output=True,
                    text=True,
                    check=True,
                    env=os.environ.copy(),
                ).stdout
                results[mode].append(json.loads(output.strip().splitlines()[-1]))
    ours = min(r["seconds"] for r in results["provider"])
    plain = min(r["seconds"] for r in results["plain"])
    growth = max(r["rss_growth_mb"] for r in results["provider"])
    plain_growth = max(r["rss_growth_mb"] for r in results["plain"])
    return [
        f"download 500 MB: provider {size / ours / 2**20:.0f} MB/s vs shutil.copyfileobj {size / plain / 2**20:.0f} MB/s, "
        f"ratio {plain / ours:.2f} (target >= 0.80); peak RSS growth {growth:.1f} MB "
        f"(copyfileobj {plain_growth:.1f} MB; target < 64 MB)"
    ]


# -- 5. submission throughput -----------------------------------------------------------------------


def bench_submit() -> list[str]:
    from evolink_provider.hooks.evolink import EvolinkHook

    count = 1000
    payload = {"model": "seedance-2.0-fast-text-to-video", "prompt": "bench submit"}

    def reuse() -> None:
        hook = EvolinkHook()
        for _ in range(count):
            hook.create_video_task(payload)
        hook.close()

    def new_session_each_call() -> None:
        for _ in range(count):
            hook = EvolinkHook()
            hook.create_video_task(payload)
            hook.close()

    lines = []
    # The real API is HTTPS only; plain HTTP on loopback shows the floor of what reuse saves.
    for tls in (True, False):
        with simulator(tls=tls) as url:
            timings = {}
            for name, run in (
                ("reuse", reuse),
                ("new", new_session_each_call),
                ("reuse2", reuse),
                ("new2", new_session_each_call),
            ):
                before = stats(url)["connections_opened"]
                start = time.perf_counter()
                run()
                # Less one: the stats request's own connection.
                timings[name] = (time.perf_counter() - start, stats(url)["connections_opened"] - before - 1)
        reuse_s = min(timings["reuse"][0], timings["reuse2"][0])
        new_s = min(timings["new"][0], timings["new2"][0])
        lines.append(
            f"submit 1,000 over {'HTTPS' if tls else 'plain HTTP'}: one hook {count / reuse_s:.0f}/s "
            f"({timings['reuse'][1]} connections) vs a new session per call {count / new_s:.0f}/s "
            f"({timings['new'][1]} connections), ratio {new_s / reuse_s:.2f} (target >= 3)"
        )
    return lines


CASES: dict[str, Callable[[], list[str]]] = {
    "polls": bench_polls,
    "parse": bench_parse,
    "submit": bench_submit,
    "download": bench_download,
    "triggerer": bench_triggerer,
}


def main() -> None:
    if sys.argv[1:2] == ["_triggers"]:  # a child of in_checkout: the simulator runs in the parent
        url, count = sys.argv[2], int(sys.argv[3])
        print(json.dumps(run_triggers(url, count, baseline=False)))
        return
    if sys.argv[1:2] == ["_aiohttp"]:  # the same, the schedule polled on a bare aiohttp session
        url, count = sys.argv[2], int(sys.argv[3])
        print(json.dumps(run_triggers(url, count, baseline=False, bare_aiohttp=True)))
        return
    chosen = sys.argv[1:] or list(CASES)
    started = time.perf_counter()
    for name in chosen:
        case_start = time.perf_counter()
        for line in CASES[name]():
            print(line, flush=True)
        print(f"  ({name}: {time.perf_counter() - case_start:.0f} s)", flush=True)
    print(f"all cases: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
