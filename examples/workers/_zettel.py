"""What the three zettel workers share: the database option and the note's JSON form."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from .logic.zettel import Note, ZettelStore

#: Where the notes live unless ``--db`` or ``ZETTEL_DB`` says otherwise.
DEFAULT_DB = Path("state/zettel.sqlite3")

NOTE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "title": {"type": "string"},
        "body": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "created_at": {"type": "string", "format": "date-time"},
    },
    "required": ["id", "title", "body", "tags", "created_at"],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--db``: the SQLite file shared by the zettel workers."""
    parser.add_argument(
        "--db",
        type=Path,
        metavar="PATH",
        default=Path(os.environ.get("ZETTEL_DB", DEFAULT_DB)),
        help="the SQLite file the zettel workers share; env ZETTEL_DB (default: %(default)s)",
    )


def open_store(options: argparse.Namespace | None) -> ZettelStore:
    """The store named by the options (``ZETTEL_DB`` or the default without options)."""
    path = options.db if options is not None else Path(os.environ.get("ZETTEL_DB", DEFAULT_DB))
    return ZettelStore(path)


def note_json(note: Note) -> dict[str, Any]:
    """A note as the workers answer it."""
    return {
        "id": note.id,
        "title": note.title,
        "body": note.body,
        "tags": list(note.tags),
        "created_at": note.created_at,
    }
