"""The request to submit: validated, fingerprinted, and with its local inputs uploaded.

Whether to submit at all is decided by :mod:`evolink_provider.ledger`; this module prepares what it POSTs:
it validates and fingerprints the request (:func:`prepare_request`), uploads local inputs only when a
submission is really made, reusing earlier uploads of the same bytes (:func:`payload_for_post`), and checks
the balance before a spend (:func:`check_balance`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from evolink_provider.answers import credits_text, finite_number, read_credits
from evolink_provider.compat import AirflowFailException
from evolink_provider.exceptions import EvolinkError, RetryLaterError, fail_for, shown_value

if TYPE_CHECKING:
    from evolink_provider.field_rules import MediaRef
    from evolink_provider.hooks.evolink import EvolinkHook
    from evolink_provider.records import UploadRecord
    from evolink_provider.uploads import ImageRules


class PreparedRequest(NamedTuple):
    """A validated request: ``payload`` still holds local inputs as their paths, ``digests`` their
    sha256 by path, and ``fingerprint`` the identity of the whole
    (:func:`~evolink_provider.records.request_fingerprint`)."""

    model: str
    fields: dict[str, Any]
    payload: dict[str, Any]
    local_media: list[MediaRef]
    digests: dict[str, str]
    fingerprint: str
    #: The model's image rules the local inputs were held to (held to again when uploaded).
    image_rules: ImageRules | None = None


def prepare_request(
    hook: EvolinkHook,
    model: str,
    fields: dict[str, Any],
    log: logging.Logger | Any,
    *,
    prompt_policy: str = "warn",
    local_checks: str = "refuse",
) -> PreparedRequest:
    """Check the rendered fields (no HTTP before that) and fingerprint what the user asked for.

    Local or object-storage inputs stay as their paths here; their bytes are hashed (sha256, read through
    the upload checks and the model's image rules) into the fingerprint, so that the request's identity
    does not depend on the temporary URLs an upload returns. They are uploaded only when a submission is
    actually made. Images uploaded by an earlier step and given as its entries (``file_url`` and
    ``sha256``: :func:`~evolink_provider.uploads.uploaded_image_urls`) are sent as their URLs and
    identified by their sha256 as well.

    :param prompt_policy: ``warn`` or ``refuse`` a prompt longer than EvoLink advises.
    :param local_checks: ``refuse`` or ``warn`` about local images that break the model's image rules.
    """
    from evolink_provider.models import validate_request
    from evolink_provider.records import request_fingerprint
    from evolink_provider.uploads import ImageRules, local_media_digests, uploaded_image_urls

    warnings: list[str] = []
    try:
        fields, uploaded = uploaded_image_urls(model, fields)
        validated = validate_request(model, fields, allow_local_media=True, prompt_policy=prompt_policy)
        rules = ImageRules.of(model, local_checks)
        digests = local_media_digests(hook, fields, validated.local_media, rules, warnings)
    except EvolinkError as error:
        fail_for(error)
    except OSError as error:
        raise AirflowFailException(f"{model}: cannot read a local input: {error}") from error
    for warning in [*validated.warnings, *warnings]:
        log.warning("%s: %s", model, warning)
    fingerprint = request_fingerprint(validated.payload, digests, uploaded)
    return PreparedRequest(
        model, fields, validated.payload, validated.local_media, digests, fingerprint, rules
    )


def payload_for_post(
    hook: EvolinkHook, request: PreparedRequest, uploads: dict[str, UploadRecord], log: logging.Logger | Any
) -> dict[str, Any]:
    """The body with every local input replaced by its Files API URL.

    ``uploads`` holds what earlier tries uploaded: an upload of the same bytes whose URL is still valid is
    reused; new uploads are added to it (the caller records them with the submission).
    """
    if not request.local_media:
        return request.payload
    from evolink_provider.models import validate_request
    from evolink_provider.records import UploadRecord, expiry_epoch
    from evolink_provider.uploads import upload_local_media

    known = {
        source: {"file_url": upload.file_url, "expires_at": upload.expires_at}
        for source, upload in uploads.items()
        if upload.reusable(request.digests.get(source, ""))
    }
    if known:
        log.info("Reusing %d upload(s) of an earlier try: %s", len(known), ", ".join(sorted(known)))
    fresh = dict(known)
    uploaded_at = time.time()
    try:
        fields = upload_local_media(hook, request.fields, request.local_media, fresh, request.image_rules)
        payload = validate_request(request.model, fields).payload
    except EvolinkError as error:
        fail_for(error)
    for source, data in fresh.items():
        if source not in known:
            uploads[source] = UploadRecord(
                source,
                request.digests[source],
                str(data["file_url"]),
                expiry_epoch(data.get("expires_at"), uploaded_at),
            )
    return payload


def check_balance(
    hook: EvolinkHook,
    min_credits: float | None,
    log: logging.Logger | Any,
    maybe_sent_key: str | None = None,
) -> None:
    """Refuse to submit when the key can spend fewer than ``min_credits`` credits (``GET /v1/credits``,
    free; :class:`~evolink_provider.answers.Credits`); ``None`` skips the check. ``maybe_sent_key``: a key an
    earlier try may have sent (Airflow 3.0-3.2 records nothing): refused retryably, so that a retry once the
    balance allows collects its task, if EvoLink created one (a clear there pays for a new generation)."""
    if min_credits is None:
        return
    least = finite_number(min_credits)
    if least is None or least < 0:
        raise AirflowFailException(
            f"min_credits={shown_value(min_credits)}: allowed values are None or a number of credits >= 0"
        )
    try:
        balance = read_credits(hook.get_credits()).spendable
    except EvolinkError as error:
        if maybe_sent_key is not None:  # no reason to give up a task an earlier try may have paid for
            raise RetryLaterError(
                f"Reading the EvoLink balance for min_credits failed ({error}): nothing was submitted; "
                f"Idempotency-Key {maybe_sent_key} may have been sent by an earlier try, and a retry resends "
                "it."
            ) from None
        fail_for(error)
    if balance < least:
        below = (
            f"EvoLink balance is {credits_text(balance)} credits, below min_credits="
            f"{credits_text(least)}: nothing was submitted."
        )
        if maybe_sent_key is None:
            raise AirflowFailException(f"{below} Top up the account or lower min_credits.")
        raise RetryLaterError(
            f"{below} Idempotency-Key {maybe_sent_key} may have been sent by an earlier try (nothing records "
            "it without task_state_store): a retry resends it once the balance allows, and collects its task "
            "if EvoLink created one; a clear pays for a new generation."
        )
    log.info(
        "EvoLink balance: %s credits (min_credits=%s): submitting.",
        credits_text(balance),
        credits_text(least),
    )
