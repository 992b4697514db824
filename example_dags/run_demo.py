"""The README's demo: run ``example_evolink_text_to_video_edit`` end to end with ``dag.test()``.

Without ``EVOLINK_API_KEY`` it starts the bundled EvoLink simulator and points the ``evolink_default``
connection at it; with the key it uses EvoLink itself (and spends credits). Everything is kept under
``./demo-output`` (a private AIRFLOW_HOME with a SQLite DB, and the videos). It prints the paths of the raw
video, the edited video and the thumbnail, and exits non-zero if the run failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUT = Path.cwd() / "demo-output"
DAG_ID = "example_evolink_text_to_video_edit"


def configure_airflow() -> None:
    """Environment for a private Airflow: must be set before ``airflow`` is first imported."""
    home = OUTPUT / "airflow-home"
    home.mkdir(parents=True, exist_ok=True)
    os.environ.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(HERE),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "EVOLINK_DEMO_OUTPUT": str(OUTPUT / "videos"),
        }
    )
    migrate = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], capture_output=True, text=True, check=False
    )
    if migrate.returncode != 0:
        sys.exit(f"airflow db migrate failed:\n{migrate.stdout}\n{migrate.stderr}")


def main() -> int:
    key = os.environ.get("EVOLINK_API_KEY", "").strip()
    simulator = None
    if key:
        connection = {"conn_type": "evolink", "password": key}
        print("Using EvoLink's API (https://api.evolink.ai): this spends credits.")
    else:
        from evolink_provider.simulator import DEFAULT_API_KEY, EvolinkSimulator

        simulator = EvolinkSimulator(task_seconds=3.0, media_dir=OUTPUT / "simulator-media").start()
        connection = {"conn_type": "evolink", "password": DEFAULT_API_KEY, "host": simulator.base_url}
        print(f"EVOLINK_API_KEY is not set: using the bundled simulator at {simulator.base_url}")
    os.environ["AIRFLOW_CONN_EVOLINK_DEFAULT"] = json.dumps(connection)
    configure_airflow()
    try:
        return run_dag()
    finally:
        if simulator is not None:
            simulator.stop()


def run_dag() -> int:
    import importlib.util

    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    spec = importlib.util.spec_from_file_location(DAG_ID, HERE / f"{DAG_ID}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag = module.dag
    run = dag.test()
    if str(run.state) != "success":
        print(f"\nThe demo run ended {run.state}; see the log above.")
        return 1
    with create_session() as session:
        row = (
            session.query(XComModel)
            .filter(
                XComModel.dag_id == DAG_ID,
                XComModel.run_id == run.run_id,
                XComModel.task_id == "edit",
                XComModel.key == "return_value",
            )
            .one()
        )
        outputs = XComModel.deserialize_value(row)
    from evolink_provider.editing import probe

    print("\nDemo finished:")
    for label in ("raw", "edited"):
        info = probe(outputs[label])
        print(
            f"  {label + ' video:':14} {outputs[label]}  ({info.duration:.1f} s, {info.width}x{info.height})"
        )
    print(f"  {'thumbnail:':14} {outputs['thumbnail']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
