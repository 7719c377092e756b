"""A small PNG writer for tests: any colour type, bit depth and scanline filter."""

from __future__ import annotations

import struct
import zlib

from examples.workers.logic.png_colour import PNG_SIGNATURE


def chunk(kind: bytes, body: bytes, *, crc: int | None = None) -> bytes:
    value = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", value)


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def filter_row(kind: int, row: bytes, previous: bytes, step: int) -> bytes:
    out = bytearray()
    for i, value in enumerate(row):
        left = row[i - step] if i >= step else 0
        up = previous[i]
        upper_left = previous[i - step] if i >= step else 0
        predictor = [0, left, up, (left + up) >> 1, _paeth(left, up, upper_left)][kind]
        out.append((value - predictor) & 0xFF)
    return bytes(out)


def pack_samples(samples: list[int], depth: int) -> bytes:
    if depth == 8:
        return bytes(samples)
    if depth == 16:
        return b"".join(struct.pack(">H", s) for s in samples)
    out = bytearray()
    per_byte = 8 // depth
    for start in range(0, len(samples), per_byte):
        byte = 0
        group = samples[start : start + per_byte]
        for i, sample in enumerate(group):
            byte |= sample << (8 - depth * (i + 1))
        out.append(byte)
    return bytes(out)


def make_png(
    width: int,
    height: int,
    rows: list[list[int]],
    *,
    colour_type: int = 2,
    depth: int = 8,
    filters: list[int] | None = None,
    extra_chunks: list[bytes] = (),  # type: ignore[assignment]
    interlace: int = 0,
) -> bytes:
    """``rows`` hold samples (channels interleaved) per row."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour_type]
    step = max(1, depth * channels // 8)
    raw = bytearray()
    previous = b""
    for y, samples in enumerate(rows):
        packed = pack_samples(samples, depth)
        if not previous:
            previous = bytes(len(packed))
        kind = filters[y % len(filters)] if filters else 0
        raw.append(kind)
        raw += filter_row(kind, packed, previous, step)
        previous = packed
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, interlace)
    return (
        PNG_SIGNATURE
        + chunk(b"IHDR", header)
        + b"".join(extra_chunks)
        + chunk(b"IDAT", zlib.compress(bytes(raw)))
        + chunk(b"IEND", b"")
    )
