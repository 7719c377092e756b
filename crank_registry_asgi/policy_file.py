"""The ``--policy`` file: read at start, re-read while the controller serves.

The core parses (:func:`crank_registry.parse_policy`) and decides
(:class:`crank_registry.BuiltinPolicy`); this module does the file's I/O.
At start an unreadable or invalid file stops the controller (the command
exits 2 with the error, which names the file, the rule and the field).
While it serves, :class:`PolicyFileWatcher` looks at the file every
``interval`` seconds, as the certificate files are watched: a valid change
replaces the rules at once (a ``policy_changed`` change of the registry,
journalled and sent to followers, made by the service's ``apply``), an
invalid one is logged and the previous rules are kept (never
half-applied). A change ``apply`` could not make (the journal refused it)
is tried again at the next look.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Awaitable, Callable

import anyio

from crank_registry import PolicyFileError, PolicyRules, parse_policy

from .effects import log_fields

__all__ = ["PolicyFileWatcher"]

logger = logging.getLogger("crank_registry_asgi.policy_file")


def _read(path: pathlib.Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise PolicyFileError(
            f"{path}: cannot read the policy file ({error.strerror or error}); "
            "check the --policy path"
        ) from None


def _parse(path: pathlib.Path, content: bytes) -> PolicyRules:
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyFileError(f"{path}: not UTF-8 text; a policy file is TOML") from None
    return parse_policy(text, str(path))


class PolicyFileWatcher:
    """Re-reads the policy file when its content changes and hands on the new rules.

    ``apply`` receives each valid new :class:`PolicyRules` (it may raise:
    the file is then read again at the next look); :meth:`check` is one
    look (tests call it after changing the file), :meth:`run` looks every
    ``interval`` seconds until cancelled.
    """

    def __init__(
        self,
        path: pathlib.Path,
        apply: Callable[[PolicyRules], Awaitable[None]],
        *,
        interval: float,
    ) -> None:
        self.path = path
        self.apply = apply
        self.interval = interval
        # What was last looked at, valid or not: an invalid file is logged once, not every poll.
        self._seen: bytes | None = None

    def start(self) -> PolicyRules:
        """Read the file the first time (it must be valid) and remember its content."""
        content = _read(self.path)
        rules = _parse(self.path, content)
        self._seen = content
        return rules

    async def check(self) -> bool:
        """Look at the file once; ``True`` when new rules were applied."""
        try:
            content = _read(self.path)
        except PolicyFileError as error:
            if self._seen is not None:
                logger.error("policy file not reloaded, previous rules kept: %s", error)
                self._seen = None
            return False
        if content == self._seen:
            return False
        try:
            rules = _parse(self.path, content)
        except PolicyFileError as error:
            self._seen = content
            logger.error("policy file not reloaded, previous rules kept: %s", error)
            return False
        await self.apply(rules)  # raises: _seen stays, so the next look tries again
        self._seen = content
        logger.info(
            "policy file reloaded %s",
            log_fields(path=str(self.path), rules=len(rules.rules), default=rules.default),
        )
        return True

    async def run(self) -> None:
        """Check the file every ``interval`` seconds until cancelled."""
        while True:
            await anyio.sleep(self.interval)
            try:
                await self.check()
            except Exception:
                logger.exception("policy file check failed; tried again at the next look")
