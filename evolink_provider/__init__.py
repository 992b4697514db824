"""Apache Airflow provider for EvoLink AI video generation."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__version__ = "0.1.0"

__all__ = ["__version__"]

# Checked through package metadata rather than ``import airflow`` so that importing the package (the
# simulator, ``get_provider_info``) stays cheap.
_airflow_major: int | None
try:
    _airflow_major = int(version("apache-airflow").split(".")[0])
except PackageNotFoundError:  # the simulator may run where Airflow is not installed
    _airflow_major = None
if _airflow_major is not None and _airflow_major < 3:
    raise RuntimeError(
        f"airflow-provider-evolink {__version__} needs Apache Airflow 3.0 or newer "
        f"(found {version('apache-airflow')})."
    )
