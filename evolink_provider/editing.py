"""Editing steps for generated videos: probe, trim, watermark, thumbnail, concatenate, contact sheet.

A thin, typed layer over the static ffmpeg that the ``imageio-ffmpeg`` wheel ships (install the provider's
``ffmpeg`` extra; no system ffmpeg is needed). Every step writes to a temporary name beside its output and
renames it once ffmpeg succeeds, so a failed edit never leaves a broken file under the final name. Paths are
local; DAGs copy ``ObjectStoragePath`` inputs to a temporary folder first.
"""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class EditingError(RuntimeError):
    """ffmpeg failed; the message ends with the tail of its error output."""


@dataclass(frozen=True)
class VideoInfo:
    duration: float
    width: int
    height: int
    has_audio: bool


def ffmpeg_executable() -> str:
    """The bundled ffmpeg (imported on first use so DAG parsing stays cheap)."""
    try:
        import imageio_ffmpeg
    except ImportError:
        raise EditingError(
            "editing needs the bundled ffmpeg: pip install 'airflow-provider-evolink[ffmpeg]'"
        ) from None
    return str(imageio_ffmpeg.get_ffmpeg_exe())


def _run(arguments: Sequence[str], output: str | Path) -> Path:
    target = Path(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.stem}.part{target.suffix}")
    command = [ffmpeg_executable(), "-hide_banner", "-loglevel", "error", "-y", *arguments, str(partial)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise EditingError(f"ffmpeg could not write {target.name}: {result.stderr.strip()[-800:]}")
    partial.replace(target)
    return target


def probe(path: str | Path) -> VideoInfo:
    """Duration, size and audio presence, read from ``ffmpeg -i`` (the wheel ships no ffprobe).

    Still images (PNG thumbnails, contact sheets) have a size and a duration of 0.
    """
    result = subprocess.run(
        [ffmpeg_executable(), "-hide_banner", "-i", str(path)], capture_output=True, text=True, check=False
    )
    text = result.stderr
    duration = re.search(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)", text)
    size = re.search(r"Stream #.*Video: .*?(\d{2,5})x(\d{2,5})", text)
    if not size:
        raise EditingError(f"{path} is not a readable video or image: {text.strip()[-300:]}")
    hours, minutes, seconds = duration.groups() if duration else ("0", "0", "0")
    return VideoInfo(
        duration=int(hours) * 3600 + int(minutes) * 60 + float(seconds),
        width=int(size.group(1)),
        height=int(size.group(2)),
        has_audio=bool(re.search(r"Stream #.*Audio:", text)),
    )


def trim(source: str | Path, output: str | Path, start: float, duration: float) -> Path:
    """Keep ``duration`` seconds from ``start`` (re-encoded, so cuts are frame-accurate)."""
    return _run(
        ["-ss", f"{start}", "-i", str(source), "-t", f"{duration}", *_encode_video(), *_encode_audio()],
        output,
    )


def add_watermark(source: str | Path, output: str | Path, text: str) -> Path:
    """Burn a caption band with ``text`` into the bottom of the video.

    The text needs a font; where the machine has none, the band is drawn without it (and logged).
    """
    band = "drawbox=x=0:y=ih-ih/8:w=iw:h=ih/8:color=black@0.55:t=fill"
    caption = _escape_drawtext(text)
    with_text = f"{band},drawtext=text='{caption}':x=w/40:y=h-h/12-th/2:fontsize=h/22:fontcolor=white"
    try:
        return _run(["-i", str(source), "-vf", with_text, *_encode_video(), "-c:a", "copy"], output)
    except EditingError as error:
        log.warning("drawtext failed (%s); drawing the caption band without text", error)
        return _run(["-i", str(source), "-vf", band, *_encode_video(), "-c:a", "copy"], output)


def thumbnail(source: str | Path, output: str | Path, at_seconds: float = 1.0) -> Path:
    """One frame as PNG."""
    return _run(["-ss", f"{at_seconds}", "-i", str(source), "-frames:v", "1"], output)


def _fitted(
    paths: Sequence[str | Path], width: int, height: int, then: str, label: str
) -> tuple[list[str], list[str]]:
    """ffmpeg inputs for ``paths``, and a filter chain each that scales and pads it to fit
    ``width`` x ``height`` (followed by the filters in ``then``), labelled ``[<label><index>]``."""
    inputs: list[str] = []
    chains = []
    for index, path in enumerate(paths):
        inputs += ["-i", str(path)]
        chains.append(
            f"[{index}:v]scale={width}:{height}:force_original_aspect_ratio=decrease,"
            f"pad={width}:{height}:(ow-iw)/2:(oh-ih)/2{then}[{label}{index}]"
        )
    return inputs, chains


def concat(sources: Sequence[str | Path], output: str | Path, width: int = 1280, height: int = 720) -> Path:
    """Join clips end to end, scaled and padded to one size so clips of any shape fit together."""
    if not sources:
        raise EditingError("nothing to concatenate")
    inputs, chains = _fitted(sources, width, height, ",setsar=1,fps=24,format=yuv420p", "v")
    joined = "".join(f"[v{index}]" for index in range(len(sources)))
    graph = ";".join([*chains, f"{joined}concat=n={len(sources)}:v=1:a=0[out]"])
    return _run([*inputs, "-filter_complex", graph, "-map", "[out]", *_encode_video()], output)


def contact_sheet(
    images: Sequence[str | Path], output: str | Path, columns: int = 4, width: int = 320
) -> Path:
    """Tile thumbnails into one PNG, ``columns`` wide."""
    if not images:
        raise EditingError("no thumbnails for a contact sheet")
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    height = width * 9 // 16
    inputs, scaled = _fitted(images, width, height, "", "t")
    cells = len(images)
    layout = "|".join(f"{(i % columns) * width}_{(i // columns) * height}" for i in range(cells))
    stacked = "".join(f"[t{i}]" for i in range(cells))
    if cells == 1:
        graph = f"{scaled[0]};[t0]null[sheet]"
    else:
        graph = ";".join([*scaled, f"{stacked}xstack=inputs={cells}:layout={layout}:fill=black[sheet]"])
    log.debug("contact sheet %dx%d", columns, rows)
    return _run([*inputs, "-filter_complex", graph, "-map", "[sheet]", "-frames:v", "1"], output)


def _encode_video() -> list[str]:
    return [
        "-c:v",
        "libx264",
        "-preset",
        "veryfast",
        "-crf",
        "28",
        "-pix_fmt",
        "yuv420p",
        "-movflags",
        "+faststart",
    ]


def _encode_audio() -> list[str]:
    return ["-c:a", "aac", "-b:a", "96k"]


def _escape_drawtext(text: str) -> str:
    return re.sub(r"([\\':%,])", r"\\\1", text)
