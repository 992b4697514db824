"""The distribution ``airflow-provider-evolink`` as an import name; the provider is ``evolink_provider``.

Airflow's example-DAG discovery (``load_examples=True``) imports every provider by its distribution name
with dashes turned into underscores and logs an ERROR traceback when that fails. This module exists so
that import succeeds; it has no ``example_dags`` folder, so nothing is added.
"""

from evolink_provider import __version__

__all__ = ["__version__"]
