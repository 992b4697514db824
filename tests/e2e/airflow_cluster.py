"""A real Airflow for the end-to-end tests, plus the EvoLink simulator.

``AirflowCluster`` is a context manager. Entering it:

- creates a temporary AIRFLOW_HOME (SQLite, LocalExecutor) and a DAGs folder holding the example DAGs, the
  e2e DAGs of ``tests/e2e/dags`` and any extra DAG sources the caller gives;
- configures Airflow only through environment variables (short scheduler, dag-processor and heartbeat
  intervals, free ports for the api-server and the two log servers, an explicit Fernet key), with the
  ``evolink_default`` connection (batch polling on) as a JSON ``AIRFLOW_CONN_*`` variable pointing at the
  simulator;
- runs ``airflow db migrate``, then starts the simulator, api-server, scheduler, dag-processor and triggerer,
  each in its own process group with its output in ``AIRFLOW_HOME/proc-logs/<name>.log``, and waits until
  the api-server reports every component healthy;
- starts a watcher thread that records, from the SQLite DB (read-only), every task-instance state and every
  trigger row seen, so tests can prove a task really was ``deferred`` and its trigger really ran.

Leaving it (normally, on an exception, on Ctrl-C or on SIGTERM) stops every process it started: SIGTERM to
each process group, SIGKILL after a grace period, then a sweep for strays (a task process lives in its own
process group) that finds them by a marker variable in their environment.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TypeVar

import requests

REPO = Path(__file__).resolve().parents[2]
E2E_DAGS = Path(__file__).resolve().parent / "dags"
#: Every process the harness starts carries this variable; its value is unique to one cluster.
MARKER_VARIABLE = "EVOLINK_E2E_CLUSTER"
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
TERMINAL_RUN_STATES = ("success", "failed")
#: The watcher's snapshot: every task instance with the trigger it waits on, if any.
WATCH_SQL = (
    "select ti.dag_id, ti.run_id, ti.task_id, ti.map_index, ti.state, "
    "t.id, t.created_date, t.classpath, t.kwargs, t.triggerer_id "
    "from task_instance ti left join trigger t on t.id = ti.trigger_id"
)

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- secrets --------------------------------------------------------------------------------------


def files_containing(root: Path, needle: str) -> list[Path]:
    """Every file under ``root`` whose raw bytes contain ``needle``: logs, the SQLite DB and its WAL
    (including deleted rows still on free pages), rendered fields, XCom, anything."""
    wanted = needle.encode()
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError):
                if wanted in path.read_bytes():
                    found.append(path)
    return found


def decrypt(fernet_key: str, token: str) -> str:
    """Decrypt a value Airflow stored with its Fernet key (trigger kwargs); plain JSON passes through."""
    if token.startswith("{"):
        return token
    from cryptography.fernet import Fernet

    return Fernet(fernet_key.encode()).decrypt(token.encode()).decode()


def secret_leaks(root: Path, secret: str, fernet_key: str, encrypted: Iterable[str] = ()) -> list[str]:
    """Where ``secret`` leaked: files under ``root`` and the (Fernet-encrypted, so invisible to a byte scan)
    trigger kwargs given in ``encrypted``."""
    leaks = [str(path) for path in files_containing(root, secret)]
    for index, token in enumerate(encrypted):
        if secret in decrypt(fernet_key, token):
            leaks.append(f"encrypted trigger kwargs #{index}")
    return leaks


# -- processes --------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the harness dies (Linux), so a killed test leaves no
    component behind."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def processes_marked(marker: str) -> list[int]:
    """The pids of live processes whose environment holds ``MARKER_VARIABLE=marker``."""
    wanted = f"{MARKER_VARIABLE}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if wanted in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class ProcessGroups:
    """Named subprocesses, each in its own process group, all stopped by ``stop_all``."""

    def __init__(self, log_dir: Path, env: dict[str, str], marker: str) -> None:
        self.log_dir = log_dir
        self.marker = marker
        self.env = {**env, MARKER_VARIABLE: marker}
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        self.running[name] = process
        return process

    def dead(self) -> dict[str, int]:
        """Processes that exited on their own, with their exit codes."""
        return {name: code for name, p in self.running.items() if (code := p.poll()) is not None}

    def stop(self, name: str, sig: int = signal.SIGTERM, grace: float = 20) -> None:
        process = self.running.pop(name, None)
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
        # The leader may be gone while its group lives on: always finish the group off.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)

    def stop_all(self, grace: float = 15) -> list[int]:
        """Stop every group (SIGTERM, then SIGKILL), then kill strays; returns the strays' pids."""
        names = list(self.running)
        for name in names:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.running[name].pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for name in names:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.running[name].wait(timeout=max(0.1, deadline - time.monotonic()))
        for name in names:
            self.stop(name, signal.SIGKILL, grace=5)
        strays = processes_marked(self.marker)
        for pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # A killed process stays visible until the kernel has torn it down: wait for that.
        deadline = time.monotonic() + 10
        while strays and processes_marked(self.marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        return strays


# -- what the watcher records -----------------------------------------------------------------------


@dataclass
class TriggerSeen:
    classpath: str
    kwargs: str  # as stored: Fernet-encrypted JSON
    triggerer_ids: set[int] = field(default_factory=set)


@dataclass
class TaskInstance:
    state: str | None
    try_number: int
    pid: int | None
    hostname: str | None


TIKey = tuple[str, str, str, int]  # dag_id, run_id, task_id, map_index
TriggerKey = tuple[int, str]  # id, created_date
#: Seconds a cluster's waits may take in all, from its creation: generous, because each wait ends as
#: soon as what it waits for is observed; only a run that is really stuck reaches it.
OVERALL_BOUND = 3600.0


class AirflowCluster:
    """See the module docstring. ``extra_dag_sources`` maps file names to DAG file contents;
    ``extra_env`` adds or overrides Airflow settings (environment variables) of every component."""

    #: The Airflow processes ``start`` spawns, by name (a profile may run several of one kind).
    components: tuple[str, ...] = COMPONENTS

    def __init__(
        self,
        *,
        extra_dag_sources: dict[str, str] | None = None,
        # Longer than the operators' 15 s wait-on-worker window, so that deferrable examples defer.
        task_seconds: float = 20,
        parallelism: int = 8,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="evolink-e2e-"))
        #: When every wait of this cluster gives up (see wait_for).
        self.bound = time.monotonic() + OVERALL_BOUND
        self.extra_dag_sources = dict(extra_dag_sources or {})
        self.task_seconds = task_seconds
        self.api_key = f"sk-sim-e2e-{secrets.token_hex(12)}"
        self.fernet_key = _fernet_key()
        self.output = self.home / "videos"
        self.api_url = f"http://127.0.0.1:{free_port()}"
        self.sim_url = f"http://127.0.0.1:{free_port()}"
        self.states_seen: dict[TIKey, set[str]] = defaultdict(set)
        self.triggers_of: dict[TIKey, set[TriggerKey]] = defaultdict(set)
        self.triggers: dict[TriggerKey, TriggerSeen] = {}
        self.watch_errors: list[str] = []
        self.lock = threading.Lock()  # guards what the watcher records
        self._stop_watching = threading.Event()
        self._watcher: threading.Thread | None = None
        self._token: str | None = None
        self._old_sigterm: Any = None
        self.strays: list[int] = []
        connection = {
            "conn_type": "evolink",
            "password": self.api_key,
            "host": self.sim_url,
            # Batch polling on, as a large deployment would run it: its coalescing runs in a real triggerer
            # here, while the dag.test() suites cover single reads.
            "extra": {
                "connect_timeout": 3,
                "read_timeout": 10,
                "backoff_base": 0.2,
                "backoff_max": 2,
                "batch_polling": True,
            },
        }
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "EVOLINK"))}
        self.env = {
            **inherited,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.home / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),
            "AIRFLOW__CORE__FERNET_KEY": self.fernet_key,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__API__PORT": self.api_url.rsplit(":", 1)[1],
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            # Runs come only from the test (an @daily example DAG would otherwise start one on unpause).
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            # A killed worker stops heartbeating: notice it in ~45 s rather than 5 minutes. Not less: on a
            # loaded CI machine a live task's supervisor once went 17 s without a heartbeat (ffmpeg and four
            # other tasks on two cores, every write through one SQLite file), and a 10 s limit failed it.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "45",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "2",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
            "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "8",
            "AIRFLOW_CONN_EVOLINK_DEFAULT": json.dumps(connection),
            "EVOLINK_DEMO_OUTPUT": str(self.output),
            **(extra_env or {}),
        }
        self.procs = ProcessGroups(self.home / "proc-logs", self.env, marker=str(self.home))

    # -- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> AirflowCluster:
        if threading.current_thread() is threading.main_thread():
            # A plain SIGTERM (CI cancelling the job) would skip every finally block: turn it into an
            # exception so the components are stopped.
            self._old_sigterm = signal.signal(signal.SIGTERM, _raise_system_exit)
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        dags = self.home / "dags"
        shutil.copytree(REPO / "example_dags", dags, ignore=shutil.ignore_patterns("__pycache__"))
        for dag_file in E2E_DAGS.glob("*.py"):
            shutil.copy(dag_file, dags / dag_file.name)
        for name, source in self.extra_dag_sources.items():
            (dags / name).write_text(source)
        self.cli("db", "migrate")
        self.procs.spawn(
            "simulator",
            [
                sys.executable,
                "-m",
                "evolink_provider.simulator",
                "--port",
                self.sim_url.rsplit(":", 1)[1],
                "--api-key",
                self.api_key,
                "--task-seconds",
                str(self.task_seconds),
                "--media-dir",
                str(self.home / "sim-media"),
            ],
        )
        for name in self.components:
            self.procs.spawn(name, self.component_command(name))
        self.wait_for(lambda: self._http_ok(f"{self.sim_url}/_simulator/stats"), 60, "the simulator")
        self.wait_for(self.all_healthy, 180, "every Airflow component to report healthy")
        self._watcher = threading.Thread(target=self._watch, name="e2e-db-watcher", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop_watching.set()
        try:
            self.strays = self.procs.stop_all()
        finally:
            if self._watcher is not None:
                self._watcher.join(timeout=5)
            if self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)
                self._old_sigterm = None

    def component_command(self, name: str) -> list[str]:
        """The command line of the component ``name``."""
        return [sys.executable, "-m", "airflow", name]

    def restart_triggerer(self, sig: int = signal.SIGTERM) -> None:
        """Stop the triggerer (SIGTERM: a restart; SIGKILL: a crash) and start a new one."""
        self.procs.stop("triggerer", sig)
        self.procs.spawn("triggerer", [sys.executable, "-m", "airflow", "triggerer"])

    # -- waiting ----------------------------------------------------------------------------------

    def wait_for(self, check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.5) -> T:
        """Poll ``check`` until it returns something truthy; fail at once if a component died.

        ``timeout`` is what the step takes at most on a quiet machine: past it a line says the step is
        slow, and the wait goes on until the cluster's overall bound (:data:`OVERALL_BOUND` from its
        creation) is spent, so that a busy machine makes a run slower, not failed."""
        began = time.monotonic()
        warned = False
        while True:
            value = check()
            if value:
                return value
            if dead := self.procs.dead():
                tails = "\n".join(f"--- {name} ---\n{self.log_tail(name)}" for name in dead)
                raise RuntimeError(f"while waiting for {what}, processes exited: {dead}\n{tails}")
            now = time.monotonic()
            if now > self.bound:
                raise TimeoutError(
                    f"waited {now - began:.0f}s for {what}: the cluster's {OVERALL_BOUND:.0f}s bound is spent"
                )
            if not warned and now - began > timeout:
                warned = True
                print(
                    f"e2e: {what} takes longer than {timeout:.0f}s (a busy machine?); still waiting",
                    flush=True,
                )
            time.sleep(interval)

    @staticmethod
    def _http_ok(url: str) -> bool:
        try:
            return requests.get(url, timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def health(self) -> dict[str, Any]:
        try:
            response = requests.get(f"{self.api_url}/api/v2/monitor/health", timeout=5)
            return dict(response.json()) if response.status_code == 200 else {}
        except (requests.RequestException, ValueError):
            return {}

    def all_healthy(self) -> bool:
        health = self.health()
        parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")
        return all((health.get(part) or {}).get("status") == "healthy" for part in parts)

    # -- the CLI and the REST API -----------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 180, ok_codes: tuple[int, ...] = (0,)) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "airflow", *args],
            env={**self.env, MARKER_VARIABLE: str(self.home)},
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode not in ok_codes:
            raise RuntimeError(
                f"airflow {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result.stdout

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        if self._token is None:
            answer = requests.get(f"{self.api_url}/auth/token", timeout=10)
            answer.raise_for_status()
            self._token = answer.json()["access_token"]
        response = requests.request(
            method,
            f"{self.api_url}/api/v2/{path.lstrip('/')}",
            headers={"Authorization": f"Bearer {self._token}"},
            timeout=30,
            **kwargs,
        )
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {response.status_code}: {response.text[:500]}")
        return response.json() if response.content else None

    def clear(self, dag_id: str, run_id: str, task_ids: list[str], only_failed: bool = False) -> list[str]:
        """Clear task instances of an existing run as the UI's Clear does (``POST clearTaskInstances``,
        ``dry_run`` false): the run, its XComs of other tasks and its ``task_state_store`` rows stay, and
        the scheduler runs the cleared tasks again. Returns the task ids cleared."""
        body = {
            "dry_run": False,
            "dag_run_id": run_id,
            "task_ids": task_ids,
            "only_failed": only_failed,
            "reset_dag_runs": True,
        }
        answer = self.api("POST", f"dags/{dag_id}/clearTaskInstances", json=body)
        return sorted(str(ti["task_id"]) for ti in answer["task_instances"])

    def import_errors(self) -> dict[str, str]:
        """``airflow dags list-import-errors``: file name -> error."""
        # It exits 1 when there are import errors.
        output = self.cli("dags", "list-import-errors", "--output", "json", ok_codes=(0, 1))
        start = min((i for i in (output.find("[{"), output.find("[]")) if i >= 0), default=-1)
        if start < 0:
            raise RuntimeError(f"unexpected list-import-errors output: {output!r}")
        rows, _ = json.JSONDecoder().raw_decode(output[start:])
        return {Path(row["filepath"]).name: str(row["error"]) for row in rows}

    def unpause(self, dag_id: str) -> None:
        self.api("PATCH", f"dags/{dag_id}", json={"is_paused": False})

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        """Unpause the DAG and start a run through the REST API; returns the run id."""
        self.unpause(dag_id)
        run_id = f"e2e__{dag_id}__{secrets.token_hex(3)}"
        self.api(
            "POST",
            f"dags/{dag_id}/dagRuns",
            json={"dag_run_id": run_id, "logical_date": None, "conf": conf or {}},
        )
        return run_id

    # -- the metadata DB (read-only) --------------------------------------------------------------

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Read the metadata DB. SQLite (WAL) lets a reader in beside the writers; a busy DB is retried,
        any other error (a wrong column, a missing table) is raised."""
        database = self.home / "airflow.db"
        for attempt in range(20):
            try:
                db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)
                try:
                    return list(db.execute(sql, params))
                finally:
                    db.close()
            except sqlite3.OperationalError as error:
                if ("locked" not in str(error) and "busy" not in str(error)) or attempt == 19:
                    raise
                time.sleep(0.2)
        raise AssertionError("unreachable")

    def dag_ids(self) -> set[str]:
        return {row[0] for row in self.query("select dag_id from dag")}

    def wait_for_dags(self, dag_ids: Iterable[str], timeout: float = 180) -> None:
        wanted = set(dag_ids)
        self.wait_for(lambda: wanted <= self.dag_ids(), timeout, f"the DAGs {sorted(wanted)} to be parsed")

    def runs(self) -> dict[tuple[str, str], str | None]:
        return {(d, r): s for d, r, s in self.query("select dag_id, run_id, state from dag_run")}

    def wait_for_runs(self, runs: dict[str, str], timeout: float) -> dict[str, str]:
        """Wait until every ``{dag_id: run_id}`` ends; returns ``{dag_id: state}``."""

        def states() -> dict[str, str] | None:
            current = self.runs()
            found = {dag_id: str(current.get((dag_id, run_id))) for dag_id, run_id in runs.items()}
            return found if all(s in TERMINAL_RUN_STATES for s in found.values()) else None

        return self.wait_for(states, timeout, f"the runs {sorted(runs)} to finish", interval=1)

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, TaskInstance]:
        """``task_id`` (``task_id[i]`` when mapped) -> the task instance's current row."""
        rows = self.query(
            "select task_id, map_index, state, try_number, pid, hostname from task_instance "
            "where dag_id = ? and run_id = ?",
            dag_id,
            run_id,
        )
        return {
            (f"{task}[{index}]" if index >= 0 else task): TaskInstance(state, tries, pid, host)
            for task, index, state, tries, pid, host in rows
        }

    def xcom(
        self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1
    ) -> Any:
        rows = self.query(
            "select value from xcom where dag_id = ? and run_id = ? and task_id = ? and key = ? "
            "and map_index = ?",
            dag_id,
            run_id,
            task_id,
            key,
            map_index,
        )
        if not rows:
            return None
        value = rows[0][0]
        return json.loads(value) if isinstance(value, (str, bytes)) else value

    def task_state_store(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> dict[str, Any]:
        rows = self.query(
            "select key, value from task_state_store where dag_id = ? and run_id = ? and task_id = ? "
            "and map_index = ?",
            dag_id,
            run_id,
            task_id,
            map_index,
        )
        return {key: json.loads(value) for key, value in rows}

    def triggerer_jobs(self) -> list[tuple[int, str]]:
        return [
            (int(i), str(s))
            for i, s in self.query("select id, state from job where job_type = 'TriggererJob'")
        ]

    def _watch(self) -> None:
        """Record every task-instance state and every trigger row seen (a trigger row is deleted once its
        task resumes, so it must be caught while it exists). One SELECT is one consistent snapshot; a
        trigger is keyed by id *and* creation time because SQLite reuses the ids of deleted rows."""
        while not self._stop_watching.wait(0.3):
            try:
                rows = self.query(WATCH_SQL)
            except Exception as error:  # keep watching; the tests report what went wrong
                self.watch_errors.append(repr(error))
                continue
            with self.lock:
                self._record(rows)

    def _record(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Note the states and triggers of one :data:`WATCH_SQL` snapshot (the caller holds the lock)."""
        for dag_id, run_id, task_id, index, state, *trigger in rows:
            key = (dag_id, run_id, task_id, int(index))
            if state:
                self.states_seen[key].add(state)
            trigger_id, created, classpath, kwargs, triggerer_id = trigger
            if trigger_id is None:
                continue
            trigger_key = (int(trigger_id), str(created))
            self.triggers_of[key].add(trigger_key)
            seen = self.triggers.setdefault(trigger_key, TriggerSeen(classpath, kwargs))
            if triggerer_id is not None:
                seen.triggerer_ids.add(int(triggerer_id))

    def seen(self, key: TIKey) -> set[str]:
        """Every state the watcher has seen the task instance in (safe while it runs)."""
        with self.lock:
            return set(self.states_seen.get(key, ()))

    def triggerers_holding(self, key: TIKey) -> set[int]:
        """The triggerer job ids seen holding any trigger of the task instance (safe while it runs)."""
        with self.lock:
            return {job for t in self.triggers_of.get(key, set()) for job in self.triggers[t].triggerer_ids}

    def trigger_kwargs(self, trigger: TriggerKey) -> dict[str, Any]:
        """The kwargs of a trigger seen by the watcher, decrypted with the cluster's Fernet key."""
        return dict(json.loads(decrypt(self.fernet_key, self.triggers[trigger].kwargs)))

    # -- chaos ------------------------------------------------------------------------------------

    def kill_worker(self, dag_id: str, run_id: str, task_id: str) -> list[int]:
        """SIGKILL a running task's worker: its LocalExecutor worker process (the task supervisor, which
        would otherwise report the failure) and the task process. Nobody reports anything: the scheduler
        must notice the missing heartbeats. Returns the pids killed."""
        ti = self.task_instances(dag_id, run_id)[task_id]
        if ti.state != "running" or not ti.pid:
            raise RuntimeError(f"{dag_id}.{task_id} is not running: {ti}")
        supervisor = parent_pid(ti.pid)
        scheduler = self.procs.running["scheduler"].pid
        if parent_pid(supervisor) != scheduler:
            raise RuntimeError(
                f"unexpected process tree: task {ti.pid} <- {supervisor} ({command_line(supervisor)}) "
                f"<- {parent_pid(supervisor)}, scheduler is {scheduler}"
            )
        for pid in (supervisor, ti.pid):
            os.kill(pid, signal.SIGKILL)
        return [supervisor, ti.pid]

    # -- simulator, logs, secrets -------------------------------------------------------------------

    def sim_stats(self) -> dict[str, Any]:
        return dict(requests.get(f"{self.sim_url}/_simulator/stats", timeout=5).json())

    def task_logs(self, dag_id: str, run_id: str | None = None) -> Iterator[Path]:
        base = self.home / "logs" / f"dag_id={dag_id}"
        pattern = f"run_id={run_id}/**/*.log" if run_id else "**/*.log"
        yield from sorted(base.glob(pattern))

    def task_log(self, dag_id: str, run_id: str, task_id: str, attempt: int, map_index: int = -1) -> str:
        folder = self.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        if map_index >= 0:
            folder /= f"map_index={map_index}"
        path = folder / f"attempt={attempt}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def task_errors(self, dag_id: str, run_id: str | None = None) -> list[str]:
        """Every error (or worse) event in the task logs of a DAG (or one run), with its exception."""
        errors = []
        for path in self.task_logs(dag_id, run_id):
            for line in path.read_text(errors="replace").splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("level") in ("error", "critical"):
                    details = [
                        f"{d.get('exc_type')}: {d.get('exc_value')}" for d in event.get("error_detail", [])
                    ]
                    errors.append(f"{path.relative_to(self.home)}: {event.get('event')} {details}")
        return errors

    def log_tail(self, name: str, lines: int = 60) -> str:
        path = self.home / "proc-logs" / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def leaks(self) -> list[str]:
        """Where the API key leaked (call after ``stop()``, so every file is complete)."""
        return secret_leaks(
            self.home, self.api_key, self.fernet_key, (t.kwargs for t in self.triggers.values())
        )


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def _raise_system_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)
