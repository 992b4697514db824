"""Small, valid image files of any pixel size for the input-rule tests (no imaging library needed)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, padding: int = 0) -> bytes:
    """A grey PNG of ``width`` x ``height`` px; ``padding`` bytes of text chunk make it as large as needed
    without changing its pixels."""
    rows = b"".join(b"\x00" + bytes([128]) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunks = [_chunk(b"IHDR", header), _chunk(b"IDAT", zlib.compress(rows, 9))]
    if padding:
        chunks.append(_chunk(b"tEXt", b"padding\x00" + b"x" * padding))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks) + _chunk(b"IEND", b"")


def write_png(path: Path, width: int, height: int, size: int = 0) -> Path:
    """Write a PNG of ``width`` x ``height`` px, at least ``size`` bytes long."""
    data = png_bytes(width, height)
    if size > len(data):
        data = png_bytes(width, height, size - len(data) + 12)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
