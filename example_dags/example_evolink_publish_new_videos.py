"""Runs on every new EvoLink video: scheduled on the asset alias that generation tasks announce on.

Shows: ``schedule=AssetAlias("evolink_videos")`` and ``triggering_asset_events``. Every asset event that
started the run names one stored video (its URI) and says what made it (its ``extra``: EvoLink task id,
model, prompt sha256, duration, size, credits). The publishing step takes a thumbnail of each local video
with the bundled ffmpeg (``evolink_provider.editing``) and writes a JSON card beside it, the place to
upload to a CMS, a review queue or an archive instead.

``example_evolink_videos_as_assets`` produces such events; so does any EvoLink operator given
``asset_alias="evolink_videos"``.
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import DAG, AssetAlias, task

# [START howto_evolink_publish_new_videos]
with DAG(
    "example_evolink_publish_new_videos",
    schedule=AssetAlias("evolink_videos"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["evolink", "example", "assets"],
) as dag:

    @task
    def publish(triggering_asset_events: Any = None) -> list[dict[str, Any]]:
        """A thumbnail and a JSON card for every new local video (other storages are only listed)."""
        import json
        from pathlib import Path
        from urllib.parse import unquote, urlsplit

        from evolink_provider import editing

        published = []
        for event in (triggering_asset_events or {}).get(AssetAlias("evolink_videos"), []):
            uri, extra = event.asset.uri, dict(event.extra or {})
            card: dict[str, Any] = {"video": uri, **extra}
            if uri.startswith("file://") and Path(video := unquote(urlsplit(uri).path)).suffix == ".mp4":
                folder = Path(video).parent / "published"
                folder.mkdir(exist_ok=True)
                stem = Path(video).stem
                card["thumbnail"] = str(editing.thumbnail(video, folder / f"{stem}.png", at_seconds=1.0))
                (folder / f"{stem}.json").write_text(json.dumps(card, indent=2))
            published.append(card)
        return published

    publish()
# [END howto_evolink_publish_new_videos]
