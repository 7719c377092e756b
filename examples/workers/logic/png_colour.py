"""image_classifier: decode a small PNG with the standard library, name its dominant colour.

The decoder handles what PNG encoders write for small images: every colour
type (grey, RGB, palette, grey + alpha, RGBA), bit depths 1 to 16,
non-interlaced, all five scanline filters, with the chunk CRCs checked and
the decompressed size bounded before decompression (no zlib bomb).
Interlaced (Adam7) images are refused with a clear error.

Each opaque pixel is named after its hue, lightness and saturation (red,
orange, yellow, green, cyan, blue, purple, pink, brown, black, white, grey);
the dominant colour is the most frequent name, and its mean RGB is reported.
"""

from __future__ import annotations

import colorsys
import struct
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence

import attrs

__all__ = [
    "MAX_PIXELS",
    "DominantColour",
    "Image",
    "PngError",
    "colour_name",
    "decode_png",
    "dominant_colour",
    "encode_png",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: The largest image accepted (width x height): small images, decoded in pure Python.
MAX_PIXELS = 256 * 256
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
RGBA = tuple[int, int, int, int]


class PngError(ValueError):
    """The bytes are not a PNG image this decoder accepts; the message says why."""


@attrs.frozen
class Image:
    """Decoded pixels, row-major, as 8-bit RGBA."""

    width: int
    height: int
    pixels: tuple[RGBA, ...]


@attrs.frozen
class DominantColour:
    """The colour name covering the most opaque pixels, its mean RGB and its share."""

    name: str
    rgb: tuple[int, int, int]
    share: float

    @property
    def hex(self) -> str:
        """``#rrggbb``."""
        return "#{:02x}{:02x}{:02x}".format(*self.rgb)


def _chunks(data: bytes) -> Iterable[tuple[bytes, bytes]]:
    if not data.startswith(PNG_SIGNATURE):
        raise PngError("not a PNG file (bad signature)")
    offset = len(PNG_SIGNATURE)
    while offset < len(data):
        if offset + 8 > len(data):
            raise PngError("truncated chunk header")
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        end = offset + 8 + length
        if end + 4 > len(data):
            raise PngError(f"truncated {kind!r} chunk")
        body = data[offset + 8 : end]
        (crc,) = struct.unpack(">I", data[end : end + 4])
        if zlib.crc32(kind + body) != crc:
            raise PngError(f"CRC mismatch in {kind!r} chunk")
        yield kind, body
        if kind == b"IEND":
            return
        offset = end + 4
    raise PngError("missing IEND chunk")


def decode_png(data: bytes) -> Image:
    """Decode a PNG to 8-bit RGBA pixels; raises :class:`PngError` for anything else."""
    header: tuple[int, int, int, int, int] | None = None
    palette: list[tuple[int, int, int]] = []
    transparency = b""
    compressed = bytearray()
    for kind, body in _chunks(data):
        if kind == b"IHDR":
            if len(body) != 13:
                raise PngError("IHDR must be 13 bytes")
            width, height, depth, colour_type, compression, filtering, interlace = struct.unpack(
                ">IIBBBBB", body
            )
            if colour_type not in _CHANNELS or depth not in _DEPTHS[colour_type]:
                raise PngError(f"invalid colour type {colour_type} with bit depth {depth}")
            if compression != 0 or filtering != 0:
                raise PngError("unknown compression or filter method")
            if interlace != 0:
                raise PngError("interlaced PNG images are not supported")
            if width == 0 or height == 0:
                raise PngError("the image has no pixels")
            if width * height > MAX_PIXELS:
                raise PngError(f"image too large: {width}x{height} (at most {MAX_PIXELS} pixels)")
            header = (width, height, depth, colour_type, _CHANNELS[colour_type])
        elif header is None:
            raise PngError("the first chunk must be IHDR")
        elif kind == b"PLTE":
            if len(body) % 3 or not body:
                raise PngError("PLTE length must be a multiple of 3")
            palette = [(body[i], body[i + 1], body[i + 2]) for i in range(0, len(body), 3)]
        elif kind == b"tRNS":
            transparency = body
        elif kind == b"IDAT":
            compressed += body
    if header is None:
        raise PngError("missing IHDR chunk")
    width, height, depth, colour_type, channels = header
    if colour_type == 3 and not palette:
        raise PngError("palette image without PLTE chunk")
    bits_per_pixel = depth * channels
    stride = (width * bits_per_pixel + 7) // 8
    expected = height * (stride + 1)
    raw = _inflate(bytes(compressed), expected)
    rows = _unfilter(raw, height, stride, max(1, bits_per_pixel // 8))
    pixels: list[RGBA] = []
    for row in rows:
        samples = _samples(row, width * channels, depth)
        pixels.extend(_to_rgba(samples, colour_type, depth, palette, transparency))
    return Image(width, height, tuple(pixels))


def _inflate(compressed: bytes, expected: int) -> bytes:
    inflater = zlib.decompressobj()
    try:
        # At most one byte more than needed: enough to notice extra data,
        # never a decompression bomb.
        raw = inflater.decompress(compressed, expected + 1)
    except zlib.error as error:
        raise PngError(f"corrupt image data: {error}") from None
    if len(raw) != expected:
        raise PngError(f"image data is {len(raw)} bytes, expected {expected}")
    return raw


def _paeth(left: int, up: int, upper_left: int) -> int:
    estimate = left + up - upper_left
    distance_left = abs(estimate - left)
    distance_up = abs(estimate - up)
    distance_upper_left = abs(estimate - upper_left)
    if distance_left <= distance_up and distance_left <= distance_upper_left:
        return left
    return up if distance_up <= distance_upper_left else upper_left


def _unfilter(raw: bytes, height: int, stride: int, step: int) -> list[bytes]:
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind = raw[start]
        line = bytearray(raw[start + 1 : start + 1 + stride])
        if kind == 1:
            for i in range(step, stride):
                line[i] = (line[i] + line[i - step]) & 0xFF
        elif kind == 2:
            for i in range(stride):
                line[i] = (line[i] + previous[i]) & 0xFF
        elif kind == 3:
            for i in range(stride):
                left = line[i - step] if i >= step else 0
                line[i] = (line[i] + ((left + previous[i]) >> 1)) & 0xFF
        elif kind == 4:
            for i in range(stride):
                left = line[i - step] if i >= step else 0
                upper_left = previous[i - step] if i >= step else 0
                line[i] = (line[i] + _paeth(left, previous[i], upper_left)) & 0xFF
        elif kind != 0:
            raise PngError(f"unknown filter type {kind} in row {y}")
        rows.append(bytes(line))
        previous = line
    return rows


def _samples(row: bytes, count: int, depth: int) -> list[int]:
    if depth == 8:
        return list(row[:count])
    if depth == 16:
        return [row[i] << 8 | row[i + 1] for i in range(0, 2 * count, 2)]
    per_byte = 8 // depth
    mask = (1 << depth) - 1
    out = []
    for i in range(count):
        byte = row[i // per_byte]
        shift = 8 - depth * (i % per_byte + 1)
        out.append((byte >> shift) & mask)
    return out


def _to_rgba(
    samples: list[int],
    colour_type: int,
    depth: int,
    palette: list[tuple[int, int, int]],
    transparency: bytes,
) -> Iterable[RGBA]:
    top = (1 << depth) - 1

    def scale(value: int) -> int:
        return value * 255 // top if depth != 8 else value

    if colour_type == 3:
        for index in samples:
            if index >= len(palette):
                raise PngError(f"palette index {index} out of range")
            alpha = transparency[index] if index < len(transparency) else 255
            yield (*palette[index], alpha)
    elif colour_type == 0:
        key = struct.unpack(">H", transparency)[0] if len(transparency) == 2 else None
        for value in samples:
            grey = scale(value)
            yield (grey, grey, grey, 0 if value == key else 255)
    elif colour_type == 2:
        key3 = struct.unpack(">HHH", transparency) if len(transparency) == 6 else None
        for i in range(0, len(samples), 3):
            rgb = samples[i : i + 3]
            alpha = 0 if key3 is not None and tuple(rgb) == key3 else 255
            yield (scale(rgb[0]), scale(rgb[1]), scale(rgb[2]), alpha)
    elif colour_type == 4:
        for i in range(0, len(samples), 2):
            grey = scale(samples[i])
            yield (grey, grey, grey, scale(samples[i + 1]))
    else:
        for i in range(0, len(samples), 4):
            r, g, b, a = (scale(v) for v in samples[i : i + 4])
            yield (r, g, b, a)


def colour_name(red: int, green: int, blue: int) -> str:
    """A plain colour name for an 8-bit RGB value."""
    hue, lightness, saturation = colorsys.rgb_to_hls(red / 255, green / 255, blue / 255)
    if lightness < 0.12:
        return "black"
    if lightness > 0.9:
        return "white"
    if saturation < 0.18:
        return "grey"
    degrees = hue * 360
    if degrees < 15 or degrees >= 345:
        return "brown" if lightness < 0.3 else ("pink" if lightness > 0.75 else "red")
    if degrees < 45:
        return "brown" if lightness < 0.35 else "orange"
    if degrees < 70:
        return "yellow"
    if degrees < 165:
        return "green"
    if degrees < 195:
        return "cyan"
    if degrees < 255:
        return "blue"
    if degrees < 320:
        return "purple"
    return "pink"


def dominant_colour(image: Image) -> DominantColour:
    """The most frequent colour name among the opaque pixels (alpha >= 128).

    A fully transparent image is ``transparent``. Ties go to the name that
    comes first alphabetically, so the answer never depends on pixel order.
    """
    names: Counter[str] = Counter()
    sums: dict[str, list[int]] = {}
    for red, green, blue, alpha in image.pixels:
        if alpha < 128:
            continue
        name = colour_name(red, green, blue)
        names[name] += 1
        total = sums.setdefault(name, [0, 0, 0])
        total[0] += red
        total[1] += green
        total[2] += blue
    if not names:
        return DominantColour("transparent", (0, 0, 0), 1.0)
    name, count = min(names.items(), key=lambda item: (-item[1], item[0]))
    red, green, blue = (round(channel / count) for channel in sums[name])
    return DominantColour(name, (red, green, blue), count / len(image.pixels))


def encode_png(width: int, height: int, pixels: Sequence[tuple[int, int, int]]) -> bytes:
    """An 8-bit RGB PNG of ``pixels`` (row-major), with filter type 0 on every row."""
    if len(pixels) != width * height:
        raise ValueError("need width * height pixels")

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    raw = bytearray()
    for y in range(height):
        raw.append(0)
        for red, green, blue in pixels[y * width : (y + 1) * width]:
            raw += bytes((red, green, blue))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(raw)))
        + chunk(b"IEND", b"")
    )
