"""Reference images uploaded once per DAG run, for every mapped generation task that shares them.

Each generation operator uploads its own local inputs, so 100 mapped tasks sharing 3 images would upload
300 files into EvoLink's Files API, whose per-account quota (2,000 files by default, 100 in some groups)
keeps each for 72 h. :class:`EvolinkUploadImagesOperator` uploads them once (checks, quota and reuse:
:func:`evolink_provider.uploads.upload_once`) and hands the URLs downstream.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from evolink_provider.exceptions import EvolinkError, fail_for
from evolink_provider.hooks.evolink import EvolinkHook

if TYPE_CHECKING:
    from airflow.sdk import Context


class EvolinkUploadImagesOperator(BaseOperator):
    """Upload reference images once and hand their URLs to the generation tasks of the run.

    Returns ``{"urls": [...], "images": [{"source", "file_url", "sha256", "expires_at", "reused"}, ...]}``
    in the order given, and pushes both lists under the XCom keys ``images`` and ``urls``. Pass
    ``upload.output["images"]`` as ``image_urls`` (``.partial(...)`` of mapped tasks): the generation
    tasks send the URLs and know each image by its sha256, so when this task is cleared and uploads
    again (new URLs, same bytes), a cleared or retried generation task still reattaches to the EvoLink
    task it paid for. ``upload.output["urls"]`` (plain URLs) loses that: a new URL is a new request.
    Uploads of an earlier run of this task (its XCom) are reused while they have more than 6 h of their
    72 h left. The Files API quota is read once, before the first upload; a run that needs more files
    than remain fails then, naming the numbers.

    :param images: local paths or storage URIs (the same rules as an operator's ``image_urls``:
        ``upload_allowed_dirs``, JPEG/PNG/WEBP/GIF, size).
    :param model: the model the images are for: its documented image rules (pixels, ratio, bytes) are
        checked before any upload; ``None`` checks none.
    :param local_checks: ``refuse`` (default) or ``warn`` about images that break the model's rules.
    :param evolink_conn_id: Airflow connection of type ``evolink``.
    """

    template_fields: Sequence[str] = ("images", "model", "evolink_conn_id")
    ui_color = "#e8defc"

    def __init__(
        self,
        *,
        images: list[str] | str,
        model: str | None = None,
        local_checks: str = "refuse",
        evolink_conn_id: str = EvolinkHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.images = images
        self.model = model
        self.local_checks = local_checks
        self.evolink_conn_id = evolink_conn_id

    @cached_property
    def hook(self) -> EvolinkHook:
        return EvolinkHook(self.evolink_conn_id)

    def execute(self, context: Context) -> dict[str, Any]:
        from evolink_provider.uploads import ImageRules, upload_once

        sources = [self.images] if isinstance(self.images, str) else list(self.images)
        earlier = context["ti"].xcom_pull(task_ids=self.task_id, include_prior_dates=True)
        earlier_images = earlier.get("images") if isinstance(earlier, dict) else None
        warnings: list[str] = []
        try:
            rules = ImageRules.of(self.model, self.local_checks)
            images = upload_once(self.hook, sources, rules, earlier_images, warnings)
        except EvolinkError as error:
            fail_for(error)
        for warning in warnings:
            self.log.warning("%s", warning)
        reused = sum(1 for image in images if image["reused"])
        self.log.info("%d image(s): %d reused from an earlier run, the rest uploaded.", len(images), reused)
        urls = [image["file_url"] for image in images]
        context["ti"].xcom_push(key="images", value=images)  # upload.output["images"]
        context["ti"].xcom_push(key="urls", value=urls)
        return {"urls": urls, "images": images}
