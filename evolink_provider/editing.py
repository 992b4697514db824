"""Editing steps for generated videos: probe, trim, watermark, thumbnail, concatenate, contact sheet.

A thin, typed layer over the static ffmpeg that the ``imageio-ffmpeg`` wheel ships (install the provider's
``ffmpeg`` extra; no system ffmpeg is needed). Every step writes to a temporary name beside its output and
renames it once ffmpeg succeeds, so a failed edit never leaves a broken file under the final name.

Inputs and outputs may be local paths or storage URIs / ``ObjectStoragePath`` (``s3://conn_id@bucket/key``,
``gs://...``; ``file://`` is local): ffmpeg needs files, so a storage input is streamed into a private
temporary folder first (at most :data:`MAX_STAGED_BYTES` each, so a wrong path cannot fill the disk) and a
storage output is written there and then streamed to its place, which it takes only once complete (an
object store's upload is published when it is closed). The temporary folder is removed in every case.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

log = logging.getLogger(__name__)

#: A local path, a storage URI or an ``ObjectStoragePath``.
Location = Union[str, Path, "ObjectStoragePath"]
#: The most a storage input may bring into the temporary folder (a generated clip is far smaller).
MAX_STAGED_BYTES = 4 << 30


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


def _local(location: Location) -> Path | None:
    """The local path a location names, or ``None`` for a storage URI."""
    if isinstance(location, Path):
        return location
    text = str(location)
    if text.startswith("file://"):
        return Path(unquote(urlsplit(text).path))
    return None if "://" in text else Path(text)


def _fetch(source: Location, folder: Path, index: int) -> Path:
    """A storage input streamed into ``folder`` (at most :data:`MAX_STAGED_BYTES`)."""
    from evolink_provider.storage import as_storage_path

    remote = as_storage_path(str(source))
    target = folder / f"input-{index}{Path(remote.name).suffix}"
    copied = 0
    with remote.open("rb") as stream, target.open("wb") as sink:
        while chunk := stream.read(1 << 20):
            copied += len(chunk)
            if copied > MAX_STAGED_BYTES:
                raise EditingError(f"{source} is larger than the {MAX_STAGED_BYTES} bytes an edit stages")
            sink.write(chunk)
    return target


@contextmanager
def _staged(sources: Sequence[Location]) -> Iterator[tuple[list[Path], Path]]:
    """Local paths for ``sources`` (storage ones copied in) and a private folder for an output."""
    with tempfile.TemporaryDirectory(prefix="evolink-edit-") as tmp:
        folder = Path(tmp)
        yield [_local(source) or _fetch(source, folder, i) for i, source in enumerate(sources)], folder


def _edit(
    sources: Sequence[Location], output: Location, build: Callable[[list[Path], Path], Path]
) -> Path | ObjectStoragePath:
    """Run ``build(local sources, local output)`` and put the result at ``output``: the path written,
    as a ``Path`` for a local output, else as the ``ObjectStoragePath`` it was streamed to."""
    target = _local(output)
    with _staged(sources) as (local_sources, folder):
        if target is not None:
            return build(local_sources, target)
        from evolink_provider.storage import as_storage_path

        remote = as_storage_path(str(output))
        written = build(local_sources, folder / f"output{Path(remote.name).suffix}")
        with written.open("rb") as stream, remote.open("wb") as sink:
            shutil.copyfileobj(stream, sink, 1 << 20)
        log.info("Wrote %s (%d bytes).", output, written.stat().st_size)
        return remote


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


def probe(path: Location) -> VideoInfo:
    """Duration, size and audio presence, read from ``ffmpeg -i`` (the wheel ships no ffprobe).

    Still images (PNG thumbnails, contact sheets) have a size and a duration of 0.
    """
    with _staged([path]) as ([local], _folder):
        result = subprocess.run(
            [ffmpeg_executable(), "-hide_banner", "-i", str(local)],
            capture_output=True,
            text=True,
            check=False,
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


def trim(source: Location, output: Location, start: float, duration: float) -> Path | ObjectStoragePath:
    """Keep ``duration`` seconds from ``start`` (re-encoded, so cuts are frame-accurate)."""
    arguments = ["-ss", f"{start}", "-i", "{0}", "-t", f"{duration}", *_encode_video(), *_encode_audio()]
    return _edit([source], output, lambda ins, out: _run(_with_inputs(arguments, ins), out))


def add_watermark(source: Location, output: Location, text: str) -> Path | ObjectStoragePath:
    """Burn a caption band with ``text`` into the bottom of the video.

    The text needs a font; where the machine has none, the band is drawn without it (and logged).
    """
    band = "drawbox=x=0:y=ih-ih/8:w=iw:h=ih/8:color=black@0.55:t=fill"
    caption = _escape_drawtext(text)
    with_text = f"{band},drawtext=text='{caption}':x=w/40:y=h-h/12-th/2:fontsize=h/22:fontcolor=white"

    def build(ins: list[Path], out: Path) -> Path:
        try:
            return _run(["-i", str(ins[0]), "-vf", with_text, *_encode_video(), "-c:a", "copy"], out)
        except EditingError as error:
            log.warning("drawtext failed (%s); drawing the caption band without text", error)
            return _run(["-i", str(ins[0]), "-vf", band, *_encode_video(), "-c:a", "copy"], out)

    return _edit([source], output, build)


def thumbnail(source: Location, output: Location, at_seconds: float = 1.0) -> Path | ObjectStoragePath:
    """One frame as PNG."""
    arguments = ["-ss", f"{at_seconds}", "-i", "{0}", "-frames:v", "1"]
    return _edit([source], output, lambda ins, out: _run(_with_inputs(arguments, ins), out))


def _with_inputs(arguments: list[str], inputs: list[Path]) -> list[str]:
    """``arguments`` with each ``{n}`` placeholder replaced by the ``n``-th local input."""
    return [str(inputs[int(item[1:-1])]) if re.fullmatch(r"\{\d+\}", item) else item for item in arguments]


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


def concat(
    sources: Sequence[Location], output: Location, width: int = 1280, height: int = 720
) -> Path | ObjectStoragePath:
    """Join clips end to end, scaled and padded to one size so clips of any shape fit together."""
    if not sources:
        raise EditingError("nothing to concatenate")

    def build(ins: list[Path], out: Path) -> Path:
        inputs, chains = _fitted(ins, width, height, ",setsar=1,fps=24,format=yuv420p", "v")
        joined = "".join(f"[v{index}]" for index in range(len(ins)))
        graph = ";".join([*chains, f"{joined}concat=n={len(ins)}:v=1:a=0[out]"])
        return _run([*inputs, "-filter_complex", graph, "-map", "[out]", *_encode_video()], out)

    return _edit(sources, output, build)


def contact_sheet(
    images: Sequence[Location], output: Location, columns: int = 4, width: int = 320
) -> Path | ObjectStoragePath:
    """Tile thumbnails into one PNG, ``columns`` wide."""
    if not images:
        raise EditingError("no thumbnails for a contact sheet")
    return _edit(images, output, lambda ins, out: _contact_sheet(ins, out, columns, width))


def _contact_sheet(images: Sequence[Path], output: Path, columns: int, width: int) -> Path:
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
