"""Real media for results: MP4s and PNGs that a downstream step can open.

With the ``[ffmpeg]`` extra (the ffmpeg of imageio-ffmpeg) every clip is made once at the requested pixel
size and duration. Without it, the simulator serves a small pre-encoded clip shipped with the package
(160x90, 1 s, H.264, with or without AAC audio) whose ``comment`` metadata names the size and duration
that were asked for, and draws PNGs in pure Python; it says which at start-up (:meth:`MediaCache.describe`).
"""

from __future__ import annotations

import os
import struct
import subprocess
import threading
import zlib
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

#: The placeholder clips hold this many ``#`` as their comment, overwritten in place (same length, so no
#: MP4 box size changes) with the label of each request.
LABEL_WIDTH = 160
PLACEHOLDER_SIZE = (160, 90)
PLACEHOLDER_SECONDS = 1


def find_ffmpeg() -> str | None:
    """The ffmpeg of the ``[ffmpeg]`` extra, or None on a plain install."""
    try:
        import imageio_ffmpeg
    except ImportError:
        return None
    return str(imageio_ffmpeg.get_ffmpeg_exe())


class MediaCache:
    """Clips by (width, height, seconds, audio), each made once even when many requests race for it."""

    def __init__(self, directory: Path, ffmpeg: str | None = None) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ffmpeg = ffmpeg or find_ffmpeg()
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def describe(self) -> str:
        """What results will be, in one sentence for the start-up log."""
        if self.ffmpeg:
            return f"results are MP4s of the requested size and duration, made with {self.ffmpeg}"
        width, height = PLACEHOLDER_SIZE
        return (
            f"results are one pre-encoded {width}x{height} {PLACEHOLDER_SECONDS} s MP4 whose comment "
            "metadata names the requested size and duration (for exact clips: "
            "pip install 'airflow-provider-evolink[ffmpeg]')"
        )

    def _once(self, name: str, write: Callable[[Path], object]) -> Path:
        target = self.directory / name
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            if not target.exists():
                partial = target.with_name(f".{name}.{os.getpid()}.part{target.suffix}")
                write(partial)
                partial.replace(target)
        return target

    def _ffmpeg(self, name: str, make: list[str]) -> Path:
        def run(partial: Path) -> None:
            assert self.ffmpeg is not None
            command = [self.ffmpeg, "-hide_banner", "-loglevel", "error", "-y", *make, str(partial)]
            subprocess.run(command, check=True, capture_output=True, timeout=120)

        return self._once(name, run)

    def video(self, width: int, height: int, seconds: int, audio: bool) -> Path:
        tag = f"{width}x{height}-{seconds}s{'-audio' if audio else ''}"
        if not self.ffmpeg:
            label = placeholder_label(width, height, seconds, audio)
            return self._once(
                f"placeholder-{tag}.mp4",
                lambda partial: partial.write_bytes(label_clip(placeholder_clip(audio), label)),
            )
        inputs = ["-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate=12:duration={seconds}"]
        codecs = ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "40", "-pix_fmt", "yuv420p"]
        if audio:
            inputs += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}"]
            codecs += ["-c:a", "aac", "-b:a", "32k", "-shortest"]
        return self._ffmpeg(f"clip-{tag}.mp4", [*inputs, *codecs, "-movflags", "+faststart"])

    def picture(self, width: int = 512, height: int = 512) -> Path:
        if not self.ffmpeg:
            return self._once(
                f"profile-{width}x{height}-drawn.png", lambda partial: partial.write_bytes(png(width, height))
            )
        return self._ffmpeg(
            f"profile-{width}x{height}.png",
            ["-f", "lavfi", "-i", f"testsrc2=size={width}x{height}", "-frames:v", "1"],
        )


def placeholder_clip(audio: bool) -> bytes:
    """The shipped clip (made once with ``-metadata comment=<LABEL_WIDTH x '#'>``, see the README)."""
    name = "placeholder-audio.mp4" if audio else "placeholder.mp4"
    return (files("evolink_provider.simulator") / "data" / name).read_bytes()


def placeholder_label(width: int, height: int, seconds: int, audio: bool) -> str:
    served = f"{PLACEHOLDER_SIZE[0]}x{PLACEHOLDER_SIZE[1]} {PLACEHOLDER_SECONDS}s"
    requested = f"{width}x{height} {seconds}s{' with audio' if audio else ''}"
    return f"EvoLink simulator without ffmpeg: requested {requested}; this clip is {served}"


def label_clip(clip: bytes, label: str) -> bytes:
    """``clip`` with its placeholder comment replaced by ``label`` (padded to the same length)."""
    placeholder = b"#" * LABEL_WIDTH
    text = label.encode("ascii")
    if clip.count(placeholder) != 1 or len(text) > LABEL_WIDTH:
        raise ValueError("the placeholder clip has no single comment slot for the label")
    return clip.replace(placeholder, text.ljust(LABEL_WIDTH))


def png(width: int, height: int) -> bytes:
    """An RGB PNG of that size (a checkerboard of 32-pixel squares), drawn without any image library."""
    light, dark = b"\xe8\xde\xfc", b"\x5b\x3f\x9e"
    rows = [
        b"\x00" + b"".join(light if (x // 32 + parity) % 2 else dark for x in range(width))
        for parity in (0, 1)
    ]
    pixels = b"".join(rows[(y // 32) % 2] for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(pixels))
        + chunk(b"IEND", b"")
    )


def image_size(data: bytes) -> tuple[str, int, int] | None:
    """(kind, width, height) of a PNG, JPEG, GIF or WEBP read from its header; None when not an image."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return "image/png", width, height
    if data[:6] in (b"GIF87a", b"GIF89a"):
        width, height = struct.unpack("<HH", data[6:10])
        return "image/gif", width, height
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        chunk = data[12:16]
        if chunk == b"VP8 " and len(data) >= 30:
            width, height = struct.unpack("<HH", data[26:30])
            return "image/webp", width & 0x3FFF, height & 0x3FFF
        if chunk == b"VP8L" and len(data) >= 25:
            bits = int.from_bytes(data[21:25], "little")
            return "image/webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8X" and len(data) >= 30:
            width = int.from_bytes(data[24:27], "little") + 1
            height = int.from_bytes(data[27:30], "little") + 1
            return "image/webp", width, height
        return "image/webp", 0, 0
    if data.startswith(b"\xff\xd8"):
        index = 2
        while index + 9 < len(data):
            if data[index] != 0xFF:
                index += 1
                continue
            marker = data[index + 1]
            length = int.from_bytes(data[index + 2 : index + 4], "big")
            if marker in (0xC0, 0xC1, 0xC2):
                height, width = struct.unpack(">HH", data[index + 5 : index + 9])
                return "image/jpeg", width, height
            index += 2 + length
        return "image/jpeg", 0, 0
    return None


def video_kind(data: bytes) -> str | None:
    """The MIME type of an MP4/MOV/WEBM file from its first bytes."""
    if data[4:8] == b"ftyp":
        return "video/quicktime" if data[8:10] == b"qt" else "video/mp4"
    if data.startswith(b"\x1a\x45\xdf\xa3"):
        return "video/webm"
    return None
