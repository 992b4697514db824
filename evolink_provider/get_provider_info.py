"""Provider metadata for Airflow's ``ProvidersManager`` (entry point ``apache_airflow_provider``).

Imports nothing, so that Airflow can list providers without loading this one.
"""

from __future__ import annotations

from typing import Any


def get_provider_info() -> dict[str, Any]:
    """Describe the provider: its modules, extra links, the ``evolink`` connection type and its UI form."""
    modules = {
        "operators": ["evolink_provider.operators.evolink", "evolink_provider.operators.upload"],
        "sensors": ["evolink_provider.sensors.evolink"],
        "hooks": ["evolink_provider.hooks.evolink"],
        "triggers": ["evolink_provider.triggers.evolink"],
    }
    return {
        "package-name": "airflow-provider-evolink",
        "name": "EvoLink",
        "description": "EvoLink AI video generation: operators, a deferrable trigger and a sensor.",
        "integrations": [
            {
                "integration-name": "EvoLink",
                "external-doc-url": "https://docs.evolink.ai",
                "tags": ["ai", "video"],
            }
        ],
        **{
            kind: [{"integration-name": "EvoLink", "python-modules": python_modules}]
            for kind, python_modules in modules.items()
        },
        "extra-links": [
            "evolink_provider.links.EvolinkVideoLink",
            "evolink_provider.links.EvolinkProfilePictureLink",
            "evolink_provider.links.EvolinkStoredFileLink",
        ],
        "connection-types": [
            {
                "connection-type": "evolink",
                "hook-class-name": "evolink_provider.hooks.evolink.EvolinkHook",
                "hook-name": "EvoLink",
                "ui-field-behaviour": {
                    "hidden-fields": ["login", "schema", "port", "extra"],
                    "relabeling": {"host": "Base URL", "password": "API key"},
                    "placeholders": {
                        "host": "https://api.evolink.ai (leave empty for EvoLink's public API)",
                        "password": "sk-...",
                    },
                },
                "conn-fields": {
                    "files_base_url": {
                        "label": "Files API base URL",
                        "description": "Where local inputs are uploaded; defaults to "
                        "https://files-api.evolink.ai for the public API and to the base URL otherwise.",
                        "schema": {"type": ["string", "null"], "format": "url"},
                    },
                    "connect_timeout": {
                        "label": "Connect timeout (s)",
                        "description": "Seconds to open a connection to EvoLink before the attempt fails "
                        "(and is retried).",
                        "schema": {"type": ["number", "null"], "minimum": 0.1, "default": 10},
                    },
                    "read_timeout": {
                        "label": "Read timeout (s)",
                        "description": "Seconds to wait for EvoLink's answer once the request is sent.",
                        "schema": {"type": ["number", "null"], "minimum": 0.1, "default": 60},
                    },
                    "max_retries": {
                        "label": "Retries per call",
                        "description": "Transient failures are retried with backoff; a POST only with the "
                        "same Idempotency-Key.",
                        "schema": {"type": ["integer", "null"], "minimum": 0, "maximum": 20, "default": 4},
                    },
                    "backoff_base": {
                        "label": "First backoff (s)",
                        "description": "The first retry waits up to this long; the bound doubles with "
                        "each further retry (jittered) up to the longest backoff.",
                        "schema": {"type": ["number", "null"], "minimum": 0, "default": 1},
                    },
                    "backoff_max": {
                        "label": "Longest backoff (s)",
                        "description": "The longest delay between two retries of one call.",
                        "schema": {"type": ["number", "null"], "minimum": 0, "default": 30},
                    },
                    "retry_after_max": {
                        "label": "Longest Retry-After honoured (s)",
                        "description": "EvoLink's Retry-After (on a 429 or 503) sets the delay before "
                        "the retry; a longer one is cut to this many seconds.",
                        "schema": {"type": ["number", "null"], "minimum": 0, "default": 120},
                    },
                    "upload_allowed_dirs": {
                        "label": "Folders local inputs may be uploaded from",
                        "description": "Comma-separated local folders or storage-URI prefixes (s3://bucket/"
                        "refs/) whose images may be uploaded to EvoLink's Files API; empty means the DAGs "
                        "folder only. Files elsewhere, /proc, /dev, /sys, FIFOs and non-images are refused.",
                        "schema": {"type": ["string", "null"]},
                    },
                    "batch_polling": {
                        "label": "Batch polling (observed endpoint)",
                        "description": "Triggers in one triggerer read their tasks 50 at a time through "
                        "the undocumented POST /v1/tasks/batch; falls back to single reads if it is missing.",
                        "schema": {"type": ["boolean", "null"], "default": False},
                    },
                },
            }
        ],
    }
