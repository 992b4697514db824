"""What importing the operators adds to a DAG file's parse, over ``import airflow.sdk``, per Airflow install.

    python bench/import_cost.py                                   # this interpreter's Airflow
    python bench/import_cost.py /venvs/af-3.0.6/bin/python ...    # one row per interpreter given
    BENCH_IMPORT_RUNS=15 python bench/import_cost.py ...          # more fresh interpreters per figure

Each figure is the median, over fresh interpreters (alternating the provider and the baseline, so a burst of
load on a shared machine touches both), of the CPU time ``import evolink_provider.operators.evolink`` takes after
``import airflow.sdk``, less the same measurement of ``pass``. The children run from a temporary folder, so
the ``evolink_provider`` they import is the one installed in that interpreter's environment (or the tree
``PYTHONPATH`` names), not this tree. They may write bytecode whatever ``PYTHONDONTWRITEBYTECODE`` says,
and a first run writes it: a deployed install has its ``.pyc`` files (pip writes them), and compiling the
sources on every import would be measured instead.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile

RUNS = int(os.environ.get("BENCH_IMPORT_RUNS", "9"))
ENV = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
#: The goal of issue 22: at most this much over ``airflow.sdk`` on every supported minor.
TARGET_MS = 50.0
STATEMENT = "import evolink_provider.operators.evolink"
#: CPU time (``time.process_time``): on a shared machine the wall time also counts other processes' turns.
PROBE = (
    "import time, importlib.metadata as m; import airflow.sdk; t = time.process_time(); {statement}; "
    "d = time.process_time() - t; print(m.version('apache-airflow'), d)"
)


def _one(python: str, statement: str, folder: str) -> tuple[str, float]:
    output = subprocess.run(
        [python, "-c", PROBE.format(statement=statement)],
        capture_output=True,
        text=True,
        check=True,
        cwd=folder,
    ).stdout
    version, seconds = output.strip().splitlines()[-1].split()
    return version, 1000 * float(seconds)


def measure(python: str) -> dict[str, float | str]:
    ours, base = [], []
    with tempfile.TemporaryDirectory() as folder:
        _one(python, STATEMENT, folder)  # write the .pyc files, warm the file cache
        for _ in range(RUNS):
            version, seconds = _one(python, STATEMENT, folder)
            ours.append(seconds)
            base.append(_one(python, "pass", folder)[1])
    added = statistics.median(ours) - statistics.median(base)
    return {"airflow": version, "added_ms": added, "min_ms": min(ours), "max_ms": max(ours)}


def main() -> None:
    pythons = sys.argv[1:] or [sys.executable]
    print(
        f"| Airflow | operators import over `airflow.sdk`, ms CPU, median of {RUNS} (range) | <= {TARGET_MS:.0f} ms? |"
    )
    print("|---|---|---|")
    for python in pythons:
        row = measure(python)
        met = "met" if float(row["added_ms"]) <= TARGET_MS else "MISSED"
        print(
            f"| {row['airflow']} | {row['added_ms']:.1f} ms ({row['min_ms']:.0f}-{row['max_ms']:.0f}) | {met} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
