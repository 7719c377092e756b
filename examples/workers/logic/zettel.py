"""The zettel workers' store: notes and links in one small SQLite file.

Three worker processes (create, search, link) share the file. WAL mode lets
readers run beside a writer, and a busy timeout makes concurrent writers
wait for each other instead of failing. Every call opens its own
connection, so a store can be used from worker threads.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import attrs

__all__ = ["Link", "Note", "UnknownNote", "ZettelStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS notes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    body TEXT NOT NULL,
    tags TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS links (
    source INTEGER NOT NULL REFERENCES notes(id),
    target INTEGER NOT NULL REFERENCES notes(id),
    relation TEXT NOT NULL,
    PRIMARY KEY (source, target)
);
CREATE INDEX IF NOT EXISTS links_by_target ON links(target);
"""


class UnknownNote(LookupError):
    """A link named a note that does not exist."""

    def __init__(self, note_id: int) -> None:
        self.note_id = note_id
        super().__init__(f"no note with id {note_id}")


@attrs.frozen
class Note:
    """A note as stored."""

    id: int
    title: str
    body: str
    tags: tuple[str, ...]
    created_at: str


@attrs.frozen
class Link:
    """A directed link between two notes."""

    source: int
    target: int
    relation: str


def _escape_like(term: str) -> str:
    return term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class ZettelStore:
    """Notes and links in the SQLite file at ``path`` (created on first use)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as connection:
            connection.executescript(_SCHEMA)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        connection = sqlite3.connect(self.path, timeout=10.0)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA foreign_keys=ON")
            with connection:  # one transaction: commit, or roll back on error
                yield connection
        finally:
            connection.close()

    def create_note(self, title: str, body: str, tags: tuple[str, ...] = (), *, now: float) -> Note:
        """Store a new note; tags are lower-cased, de-duplicated and sorted."""
        clean_tags = tuple(sorted({tag.strip().lower() for tag in tags if tag.strip()}))
        created_at = datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat(
            timespec="seconds"
        )
        with self._connect() as connection:
            cursor = connection.execute(
                "INSERT INTO notes (title, body, tags, created_at) VALUES (?, ?, ?, ?)",
                (title.strip(), body, json.dumps(clean_tags), created_at),
            )
            note_id = cursor.lastrowid
        assert note_id is not None
        return Note(note_id, title.strip(), body, clean_tags, created_at)

    def get_note(self, note_id: int) -> Note:
        """The note with ``note_id``; raises :class:`UnknownNote`."""
        with self._connect() as connection:
            row = connection.execute(
                "SELECT id, title, body, tags, created_at FROM notes WHERE id = ?", (note_id,)
            ).fetchone()
        if row is None:
            raise UnknownNote(note_id)
        return _note(row)

    def search(self, query: str, *, tag: str | None = None, limit: int = 10) -> list[Note]:
        """Notes containing every word of ``query`` (case-insensitive), best first.

        A match in the title counts twice as much as one in the body; ties
        go to the newer note. ``tag`` keeps only notes with that tag.
        """
        words = [word.lower() for word in query.split()]
        clauses = []
        parameters: list[str] = []
        for word in words:
            clauses.append(
                "(lower(title) LIKE ? ESCAPE '\\' OR lower(body) LIKE ? ESCAPE '\\'"
                " OR lower(tags) LIKE ? ESCAPE '\\')"
            )
            pattern = f"%{_escape_like(word)}%"
            parameters += [pattern, pattern, pattern]
        where = " AND ".join(clauses) if clauses else "1"
        with self._connect() as connection:
            rows = connection.execute(
                f"SELECT id, title, body, tags, created_at FROM notes WHERE {where}",
                parameters,
            ).fetchall()
        notes = [_note(row) for row in rows]
        if tag is not None:
            notes = [note for note in notes if tag.strip().lower() in note.tags]

        def score(note: Note) -> tuple[int, int]:
            title, body = note.title.lower(), note.body.lower()
            return (sum(2 * title.count(w) + body.count(w) for w in words), note.id)

        notes.sort(key=score, reverse=True)
        return notes[:limit]

    def link(self, source: int, target: int, relation: str = "related") -> Link:
        """Link ``source`` to ``target`` (replacing an earlier relation between them)."""
        if source == target:
            raise ValueError("a note cannot link to itself")
        with self._connect() as connection:
            for note_id in (source, target):
                if (
                    connection.execute("SELECT 1 FROM notes WHERE id = ?", (note_id,)).fetchone()
                    is None
                ):
                    raise UnknownNote(note_id)
            connection.execute(
                "INSERT INTO links (source, target, relation) VALUES (?, ?, ?)"
                " ON CONFLICT (source, target) DO UPDATE SET relation = excluded.relation",
                (source, target, relation),
            )
        return Link(source, target, relation)

    def backlinks(self, note_id: int) -> list[Link]:
        """The links pointing at ``note_id``, by source id."""
        with self._connect() as connection:
            rows = connection.execute(
                "SELECT source, target, relation FROM links WHERE target = ? ORDER BY source",
                (note_id,),
            ).fetchall()
        return [Link(*row) for row in rows]


def _note(row: tuple[int, str, str, str, str]) -> Note:
    note_id, title, body, tags, created_at = row
    return Note(note_id, title, body, tuple(json.loads(tags)), created_at)
