"""Every Airflow-version branch of the provider, in one place.

Supported: Airflow 3.0, 3.1, 3.2 and 3.3 (CI runs a smoke matrix on the latest patch of each). The rest
of the package imports these names from here and never asks which Airflow it runs on. What moved where:

===============================================  =====================================
name                                             older home
===============================================  =====================================
``airflow.sdk.BaseHook``                         ``airflow.hooks.base`` (3.0)
``airflow.sdk.conf``                             ``airflow.configuration`` (3.0, 3.1)
``airflow.sdk.exceptions.AirflowFailException``  ``airflow.exceptions`` (3.0, 3.1)
``airflow.sdk.log.amask_secret``                 missing before 3.3
``task_state_store`` in the task context         missing before 3.3 (see :func:`log_once`)
===============================================  =====================================

A connection is read on an event loop by ``apache-airflow-providers-common-compat``'s
``get_async_connection``: ``aget_connection`` where it is safe, else ``get_connection`` in a
``sync_to_async`` thread (Airflow 3.0 has no ``aget_connection``; from common-compat 1.23 it also avoids the
``DeadlockImminentError`` of 3.3.0-3.3.1's ``aget_connection``, apache/airflow#71891).

What stays here, each for one reason: common-compat's ``sdk`` names arrived in 1.8 and
``get_async_connection`` in 1.10, newer than the common-compat 1.7 that Airflow 3.0.6's constraints pin
(so the older homes are still looked up here, and ``get_connection`` runs in a thread where common-compat
lacks the function); common-compat has no ``amask_secret``.

The async fallbacks run the sync call through ``asgiref.sync_to_async``, as Airflow 3.0 documents for
triggers: on 3.0 and 3.1 the triggerer's sync channel to its supervisor is ``async_to_sync``, which finds
the triggerer's own loop only from a ``sync_to_async`` thread (a plain ``asyncio.to_thread`` thread would
drive that channel from a second loop). Called directly on the loop it would raise or block.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # type-checked against the newest Airflow
    from airflow.sdk import BaseHook, conf
    from airflow.sdk.exceptions import AirflowFailException
    from airflow.sdk.log import amask_secret
else:
    try:
        from airflow.sdk import conf
    except ImportError:  # Airflow 3.0, 3.1
        from airflow.configuration import conf

    try:
        from airflow.sdk.exceptions import AirflowFailException
    except ImportError:  # Airflow 3.0, 3.1
        from airflow.exceptions import AirflowFailException

    try:
        from airflow.sdk import BaseHook
    except ImportError:  # Airflow 3.0
        from airflow.hooks.base import BaseHook

    try:
        from airflow.sdk.log import amask_secret
    except ImportError:  # Airflow 3.0 to 3.2

        async def amask_secret(secret: Any, name: str | None = None) -> None:
            """``mask_secret`` from a coroutine without blocking or re-entering the triggerer's loop."""
            from airflow.sdk.log import mask_secret
            from asgiref.sync import sync_to_async

            await sync_to_async(mask_secret)(secret, name)


__all__ = [
    "AirflowFailException",
    "BaseHook",
    "amask_secret",
    "conf",
    "get_async_connection",
    "get_async_extra_dejson",
    "hook_field_behaviour",
    "log_once",
]


async def get_async_connection(conn_id: str) -> Any:
    """The connection, read on an event loop by common-compat's ``get_async_connection`` (imported here, on
    a trigger's run path, not when a DAG file is parsed); where the installed common-compat predates it
    (1.10), ``get_connection`` in a ``sync_to_async`` thread, which never blocks the loop."""
    try:
        from airflow.providers.common.compat.connection import get_async_connection as read
    except ImportError:  # common-compat before 1.10
        from asgiref.sync import sync_to_async

        return await sync_to_async(BaseHook.get_connection)(conn_id)
    return await read(conn_id)


async def get_async_extra_dejson(conn: Any) -> dict[str, Any]:
    """The connection's extra, read on an event loop by common-compat's ``get_async_extra_dejson``:
    ``extra_dejson`` masks the extra's secrets with a synchronous call to the supervisor, which raises
    ``DeadlockImminentError`` on a loop with another async call in flight. Where the installed
    common-compat predates it, ``extra_dejson`` in a ``sync_to_async`` thread, as for the connection."""
    try:
        from airflow.providers.common.compat.connection import get_async_extra_dejson as read
    except ImportError:  # common-compat before 1.23
        from asgiref.sync import sync_to_async

        return await sync_to_async(lambda: conn.extra_dejson)()
    return await read(conn)


_said: set[str] = set()
_said_lock = threading.Lock()


def log_once(logger: Any, message: str) -> None:
    """Warn about a limitation of this Airflow version once per process rather than once per task."""
    with _said_lock:
        if message in _said:
            return
        _said.add(message)
    logger.warning(message)


def hook_field_behaviour(connection_type: str) -> dict[str, Any]:
    """The provider info's ``ui-field-behaviour`` in the shape of ``BaseHook.get_ui_field_behaviour``.

    Airflow 3.0 and 3.1 build the connection form only from hook methods; 3.2+ read the provider info and
    skip the method. The extra field stays visible here: 3.0 and 3.1 do not show the ``conn-fields`` that
    replace it on 3.2+.
    """
    from evolink_provider.get_provider_info import get_provider_info

    (declared,) = (
        entry["ui-field-behaviour"]
        for entry in get_provider_info()["connection-types"]
        if entry["connection-type"] == connection_type
    )
    return {
        "hidden_fields": [name for name in declared["hidden-fields"] if name != "extra"],
        "relabeling": dict(declared["relabeling"]),
        "placeholders": dict(declared["placeholders"]),
    }
