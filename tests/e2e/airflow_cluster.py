"""A real Airflow for the end-to-end tests: api-server, scheduler, dag-processor and triggerer as separate
processes on a temporary AIRFLOW_HOME with SQLite and the LocalExecutor, plus the EvoLink simulator.

Every process runs in its own process group with its log in AIRFLOW_HOME/proc-logs; leaving the context
stops them all (SIGTERM, then SIGKILL after a grace period), whatever happened inside.
"""

from __future__ import annotations

import contextlib
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
from pathlib import Path
from types import TracebackType
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[2]
E2E_DAGS = Path(__file__).resolve().parent / "dags"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def files_containing(root: Path, needle: str) -> list[Path]:
    """Every file under ``root`` whose bytes contain ``needle`` (logs, the SQLite DB, anything)."""
    wanted = needle.encode()
    return [path for path in root.rglob("*") if path.is_file() and wanted in path.read_bytes()]


class AirflowCluster:
    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="evolink-e2e-"))
        self.api_key = f"sk-sim-e2e-{secrets.token_hex(12)}"
        self.output = self.home / "videos"
        self.api_port = free_port()
        self.sim_url = f"http://127.0.0.1:{free_port()}"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.states_seen: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.max_triggers = 0
        self._watching = threading.Event()
        connection = {
            "conn_type": "evolink",
            "password": self.api_key,
            "host": self.sim_url,
            "extra": {"connect_timeout": 3, "read_timeout": 5, "backoff_base": 0.2, "backoff_max": 2},
        }
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "EVOLINK"))},
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.home / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "8",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.api_port}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
            "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "8",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
            "AIRFLOW_CONN_EVOLINK_DEFAULT": json.dumps(connection),
            "EVOLINK_DEMO_OUTPUT": str(self.output),
        }

    # -- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> AirflowCluster:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def _start(self) -> None:
        shutil.copytree(
            REPO / "example_dags", self.home / "dags", ignore=shutil.ignore_patterns("__pycache__")
        )
        for dag_file in E2E_DAGS.glob("*.py"):
            shutil.copy(dag_file, self.home / "dags" / dag_file.name)
        (self.home / "proc-logs").mkdir()
        self.cli("db", "migrate")
        port = self.sim_url.rsplit(":", 1)[1]
        self.spawn(
            "simulator",
            [
                sys.executable,
                "-m",
                "evolink_provider.simulator",
                "--port",
                port,
                "--api-key",
                self.api_key,
                "--task-seconds",
                # Longer than the scheduler takes to record a deferral under load: a trigger that fires
                # before that meets an Airflow race ("finished with state success, but ... queued").
                "10",
                "--media-dir",
                str(self.home / "sim-media"),
            ],
        )
        for name in ("api-server", "scheduler", "dag-processor", "triggerer"):
            self.spawn(name, [sys.executable, "-m", "airflow", name])
        self.wait_for(lambda: self._http_ok(f"{self.sim_url}/_simulator/stats"), 60, "the simulator")
        self.wait_for(
            lambda: self._http_ok(f"http://127.0.0.1:{self.api_port}/api/v2/monitor/health"),
            180,
            "the api-server",
        )
        threading.Thread(target=self._watch_states, daemon=True).start()

    def spawn(self, name: str, command: list[str]) -> None:
        log = (self.home / "proc-logs" / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def terminate(self, name: str, sig: int = signal.SIGTERM, grace: float = 20) -> None:
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def stop(self) -> None:
        self._watching.set()
        for name in list(self.processes):
            self.terminate(name, grace=10)

    def restart_triggerer(self) -> None:
        self.terminate("triggerer")
        self.spawn("triggerer", [sys.executable, "-m", "airflow", "triggerer"])

    # -- helpers ----------------------------------------------------------------------------------

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "airflow", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if result.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    @staticmethod
    def _http_ok(url: str) -> bool:
        try:
            return requests.get(url, timeout=2).status_code == 200
        except requests.RequestException:
            return False

    @staticmethod
    def wait_for(check: Any, timeout: float, what: str) -> Any:
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}")

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Read the metadata DB (read-only; SQLite allows a reader beside the writers)."""
        database = self.home / "airflow.db"
        if not database.exists():
            return []
        try:
            with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10) as db:
                return list(db.execute(sql, params))
        except sqlite3.OperationalError:
            return []

    def _watch_states(self) -> None:
        """Record every task state seen, to prove tasks really went through ``deferred``."""
        while not self._watching.wait(0.3):
            for dag_id, task_id, state in self.query("select dag_id, task_id, state from task_instance"):
                if state:
                    self.states_seen[(dag_id, task_id)].add(state)
            triggers = self.query("select count(*) from trigger")
            if triggers:
                self.max_triggers = max(self.max_triggers, int(triggers[0][0]))

    def sim_stats(self) -> dict[str, Any]:
        return dict(requests.get(f"{self.sim_url}/_simulator/stats", timeout=5).json())

    def wait_for_dags(self, dag_ids: set[str], timeout: float = 180) -> None:
        def parsed() -> bool:
            return dag_ids <= {row[0] for row in self.query("select dag_id from dag")}

        self.wait_for(parsed, timeout, f"the DAGs {sorted(dag_ids)} to be parsed")

    def trigger(self, dag_id: str) -> str:
        run_id = f"e2e__{dag_id}__{secrets.token_hex(3)}"
        self.cli("dags", "trigger", dag_id, "--run-id", run_id)
        return run_id

    def run_state(self, dag_id: str, run_id: str) -> str | None:
        rows = self.query("select state from dag_run where dag_id = ? and run_id = ?", dag_id, run_id)
        return rows[0][0] if rows else None

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 300) -> str:
        return str(
            self.wait_for(
                lambda: (state := self.run_state(dag_id, run_id)) in ("success", "failed") and state,
                timeout,
                f"{dag_id} {run_id} to finish",
            )
        )

    def task_rows(self, dag_id: str, run_id: str) -> dict[str, tuple[str, int, int | None]]:
        rows = self.query(
            "select task_id, map_index, state, try_number, pid from task_instance "
            "where dag_id = ? and run_id = ?",
            dag_id,
            run_id,
        )
        return {f"{t}[{m}]" if m >= 0 else t: (s, n, pid) for t, m, s, n, pid in rows}

    def xcom(self, dag_id: str, run_id: str, task_id: str) -> Any:
        rows = self.query(
            "select value from xcom where dag_id = ? and run_id = ? and task_id = ? and key = 'return_value'",
            dag_id,
            run_id,
            task_id,
        )
        value = rows[0][0] if rows else None
        return json.loads(value) if isinstance(value, (str, bytes)) else value

    def log_tail(self, name: str, lines: int = 60) -> str:
        path = self.home / "proc-logs" / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""
