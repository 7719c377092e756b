"""image_classifier: ``classify`` ``image.color`` names the dominant colour of a small PNG.

The PNG arrives base64-encoded and is decoded with the standard library only
(zlib and the PNG scanline filters), see :mod:`examples.workers.logic.png_colour`.

Run: ``python -m examples.workers.image_classifier``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
from collections.abc import Mapping
from typing import Any

import anyio

from crank_worker_client.serving import Handler, InvocationError

from ._runner import run_worker, schema
from .logic.png_colour import MAX_PIXELS, PngError, decode_png, dominant_colour

NAME = "image_classifier"

COLOUR_NAMES = [
    "black",
    "blue",
    "brown",
    "cyan",
    "green",
    "grey",
    "orange",
    "pink",
    "purple",
    "red",
    "transparent",
    "white",
    "yellow",
]

CAPABILITIES = (
    schema(
        "classify",
        "image.color",
        input_schema={
            "type": "object",
            "properties": {
                "png_base64": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 700000,
                    "contentEncoding": "base64",
                    "contentMediaType": "image/png",
                    "description": f"a PNG image of at most {MAX_PIXELS} pixels",
                }
            },
            "required": ["png_base64"],
            "additionalProperties": False,
        },
        output_schema={
            "type": "object",
            "properties": {
                "color": {"type": "string", "enum": COLOUR_NAMES},
                "rgb": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 255},
                    "minItems": 3,
                    "maxItems": 3,
                },
                "hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"},
                "share": {"type": "number", "minimum": 0, "maximum": 1},
                "width": {"type": "integer", "minimum": 1},
                "height": {"type": "integer", "minimum": 1},
            },
            "required": ["color", "rgb", "hex", "share", "width", "height"],
        },
        max_concurrency=2,
    ),
)


def classify_png(data: bytes) -> dict[str, Any]:
    """Decode ``data`` and describe its dominant colour (CPU-bound: run it in a thread)."""
    image = decode_png(data)
    colour = dominant_colour(image)
    return {
        "color": colour.name,
        "rgb": list(colour.rgb),
        "hex": colour.hex,
        "share": round(colour.share, 4),
        "width": image.width,
        "height": image.height,
    }


async def classify(payload: dict[str, Any]) -> dict[str, Any]:
    """``classify`` ``image.color``: ``{"png_base64"}`` -> the dominant colour."""
    try:
        data = base64.b64decode(payload["png_base64"], validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvocationError("invalid_image", f"png_base64 is not base64: {error}") from None
    try:
        return await anyio.to_thread.run_sync(classify_png, data)
    except PngError as error:
        raise InvocationError("invalid_image", str(error)) from None


def make_handlers(options: argparse.Namespace | None = None) -> Mapping[tuple[str, str], Handler]:
    """The handlers of this worker."""
    return {("classify", "image.color"): classify}


if __name__ == "__main__":
    run_worker(NAME, CAPABILITIES, make_handlers)
