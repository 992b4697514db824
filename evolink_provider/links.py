"""Extra links in the task view: the result video, the sora-character picture and the stored file.

Airflow 3 keeps an extra link per task instance in XCom: the operator pushes the targets under
:data:`XCOM_LINKS_KEY` when it finishes, and at the end of the task Airflow calls each link's ``get_link``,
which reads them back (``XCom.get_value``) and stores the URL the UI shows (an empty one when the try
finished nothing). The links are listed in the
provider info (``extra-links``), so ``airflow providers links`` names them.

Trust boundary: a URL comes from EvoLink's answer, which is not trusted, and ends up as an ``href`` in
the UI. Only an absolute ``http``/``https`` URL with a host, no user info, none of
:func:`has_unsafe_characters`' characters and at most :data:`MAX_LINK_LENGTH` characters is ever a link
(:func:`safe_link`); anything
else (``javascript:``, ``data:``, a relative path) gives no link. It is checked when pushed and again when
read.
"""

from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote, urlsplit

from airflow.sdk import BaseOperatorLink

from evolink_provider.results import result_urls

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator, Context
    from airflow.sdk.types import TaskInstanceKey

#: The XCom key holding ``{target: url}`` of a finished task instance.
XCOM_LINKS_KEY = "evolink_links"
MAX_LINK_LENGTH = 4096
_UNSAFE_CHARACTERS = re.compile(r"[\x00-\x20\x7f\\\"'<>`]")


def has_unsafe_characters(text: str) -> bool:
    """Whether ``text`` holds a character no link or asset URI may: ASCII controls, whitespace, quotes,
    ``<>`\\`` (they escape an attribute), and any Unicode control, format or separator character
    (categories ``C*`` and ``Z*``: U+202E reverses the host a reader sees, U+200B hides a character,
    U+2028 breaks a line)."""
    if _UNSAFE_CHARACTERS.search(text):
        return True
    return not text.isascii() and any(unicodedata.category(char)[0] in "CZ" for char in text)


def safe_link(url: object) -> str | None:
    """``url`` if it may be shown as a link: absolute http(s), a host, nothing that could escape an
    attribute or hide the real host; else ``None``."""
    if not isinstance(url, str) or not url or len(url) > MAX_LINK_LENGTH or has_unsafe_characters(url):
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        return None
    return url


def stored_file_link(location: str) -> str | None:
    """The http(s) form of a stored result, where its storage has one a person can open.

    ``s3://`` opens the object in the AWS console, ``gs://`` and ``gcs://`` through Google Cloud Storage's
    authenticated URL, ``http(s)://`` as it is; local files and other storages have none.
    """
    parts = urlsplit(location)
    scheme, bucket, key = parts.scheme.lower(), parts.netloc, parts.path.lstrip("/")
    if scheme in ("http", "https"):
        return safe_link(location)
    if not bucket or not key:
        return None
    if scheme in ("s3", "s3a"):
        return safe_link(f"https://s3.console.aws.amazon.com/s3/object/{quote(bucket)}?prefix={quote(key)}")
    if scheme in ("gs", "gcs"):
        return safe_link(f"https://storage.cloud.google.com/{quote(bucket)}/{quote(key)}")
    return None


def link_targets(task: dict[str, Any]) -> dict[str, str]:
    """``{"video": ..., "profile_picture": ..., "stored_file": ...}`` of a finished task, each only when
    there is a safe URL for it."""
    data = task.get("result_data")
    picture = data.get("profile_picture_url") if isinstance(data, dict) else None
    videos = [url for url in result_urls(task) if url != picture]
    candidates = {
        "video": next((link for url in videos if (link := safe_link(url))), None),
        "profile_picture": safe_link(picture),
        "stored_file": next(
            (link for location in task.get("files") or [] if (link := stored_file_link(str(location)))),
            None,
        ),
    }
    return {name: url for name, url in candidates.items() if url}


def push_links(context: Context, task: dict[str, Any]) -> None:
    """Keep the link targets of this task instance in XCom, for :class:`EvolinkLink` to read."""
    context["ti"].xcom_push(key=XCOM_LINKS_KEY, value=link_targets(task))


class EvolinkLink(BaseOperatorLink):
    """A link whose URL the EvoLink operator kept in XCom (see the module docstring)."""

    target: ClassVar[str]

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        if getattr(operator, "finished_task", None) is None:
            # This try handed nothing downstream (it failed): no link, and no lookup of an XCom that
            # is not there (Airflow's client logs that as an error).
            return ""
        from airflow.sdk.execution_time.xcom import XCom

        targets = XCom.get_value(ti_key=ti_key, key=XCOM_LINKS_KEY)
        url = targets.get(self.target) if isinstance(targets, dict) else None
        return safe_link(url) or ""


class EvolinkVideoLink(EvolinkLink):
    """The result video on EvoLink's servers (the URL expires 24 h after the task completed)."""

    name = "EvoLink video"
    target = "video"


class EvolinkProfilePictureLink(EvolinkLink):
    """The profile picture of a sora-character task (expires after 24 h like every result)."""

    name = "EvoLink profile picture"
    target = "profile_picture"


class EvolinkStoredFileLink(EvolinkLink):
    """The first result stored under ``output_path``, where that storage has an http(s) form."""

    name = "Stored video"
    target = "stored_file"


RESULT_LINKS = (EvolinkVideoLink(), EvolinkProfilePictureLink(), EvolinkStoredFileLink())
