"""SLO files: read at start, and again whenever they change while the controller serves.

``STATE_DIR/slos/*.yaml``, one capability a file (DESIGN, "Routing
options")::

    # state/controller/slos/image-classify.yaml
    verb: classify
    capability: image.classify
    version: ">=1.2,<2"      # optional: only workers of these versions
    latency_p95_ms: 120
    availability: 0.995
    error_budget_pct: 0.5

Each file is read with ``yaml.safe_load`` and checked by the core's model
(:class:`~crank_registry.ServiceLevel`, through the converter): an unknown
key, a value of the wrong type or out of range is refused, naming the file
and the field. The files are taken all together or not at all: the core
gets them as values, and putting new ones in effect is a change of the
registry (``slos_changed``: :meth:`~crank_registry.CapabilityRegistry.decide_slos`),
journalled and sent to followers like any other; the service's ``put``
function makes it.

:class:`SloWatcher` reads them at start (:meth:`~SloWatcher.load`, which
raises :class:`SloFileError`: the controller does not start on an invalid
file; the service puts them in effect once the journal is replayed) and
then looks at the directory every ``interval`` seconds
(:meth:`~SloWatcher.check`): when a file was added, removed or changed
(its name, size, modification time or inode), all files are read again;
an invalid change is logged and the SLOs in effect are kept. A change the
journal could not take is tried again at the next look.
"""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Awaitable, Callable

import anyio
import yaml

from crank_registry import (
    CapabilityRegistry,
    ServiceLevel,
    ServiceLevels,
    SloFile,
    ValidationError,
    structure,
)

from .effects import log_fields

__all__ = [
    "DEFAULT_POLL_INTERVAL",
    "SLO_DIRECTORY",
    "SloFileError",
    "SloWatcher",
    "read_slos",
    "slo_directory",
]

logger = logging.getLogger("crank_registry_asgi.slos")

#: The SLO files' directory, under the state directory.
SLO_DIRECTORY = "slos"
#: Seconds between two looks at the SLO directory.
DEFAULT_POLL_INTERVAL = 5.0

_KEYS = "verb, capability, version, latency_p95_ms, availability, error_budget_pct"

# What identifies a version of the directory: each file's name, size,
# modification time and inode (an editor that saves by renaming makes a new one).
Fingerprint = tuple[tuple[str, int, int, int], ...]


class SloFileError(ValueError):
    """An SLO file that cannot be used; the message names the file, the field and what is wrong."""


def read_slos(directory: pathlib.Path) -> tuple[SloFile, ...]:
    """Every ``*.yaml`` file of ``directory``, read and checked, in the order of their names.

    No directory: no SLO files. Raises :class:`SloFileError` naming the
    first invalid file, with every problem of that file, in one line.
    Whether the files go together (two of them may not state the SLO of
    the same capability and versions) is the registry's check
    (:meth:`SloWatcher.apply`).
    """
    return tuple(_read_one(path) for path in _slo_paths(directory))


def _slo_paths(directory: pathlib.Path) -> list[pathlib.Path]:
    if not directory.is_dir():
        return []
    return sorted(path for path in directory.glob("*.yaml") if path.is_file())


def _read_one(path: pathlib.Path) -> SloFile:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SloFileError(f"{path}: cannot read it: {error.strerror}") from None
    except UnicodeDecodeError:
        raise SloFileError(f"{path}: not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = "" if mark is None else f" (line {mark.line + 1}, column {mark.column + 1})"
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise SloFileError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        found = "an empty file" if data is None else f"a {type(data).__name__}"
        raise SloFileError(f"{path}: expected a mapping of {_KEYS}; found {found}")
    try:
        level = structure(data, ServiceLevel)
    except ValidationError as error:
        raise SloFileError(
            f"{path}: "
            + "; ".join(
                f"field {problem.path}: {problem.message}" if problem.path else problem.message
                for problem in error.problems
            )
        ) from None
    return SloFile(file=path.name, slo=level)


def _fingerprint(directory: pathlib.Path) -> Fingerprint:
    entries = []
    for path in _slo_paths(directory):
        try:
            status = path.stat()
        except OSError:  # removed between the listing and the look: the next poll sees it
            continue
        entries.append((path.name, status.st_size, status.st_mtime_ns, status.st_ino))
    return tuple(entries)


#: Puts SLO files in effect: decides the registry's change, makes it durable, applies it.
PutSlos = Callable[[tuple[SloFile, ...]], Awaitable[None]]


class SloWatcher:
    """Keeps a registry's SLO files those of ``directory``, read again when they change.

    :meth:`load` once at start (the service then ``put``s them), then
    :meth:`run` in the lifespan's task group (tests call :meth:`check`
    directly, after changing the files). ``put`` puts files in effect
    (the service's: a ``slos_changed`` change, journalled); it may raise
    (the journal refused the change), and the next look tries again.
    """

    def __init__(
        self,
        directory: pathlib.Path,
        registry: CapabilityRegistry,
        *,
        put: PutSlos,
        interval: float = DEFAULT_POLL_INTERVAL,
    ) -> None:
        self.directory = directory
        self.registry = registry
        self.put = put
        self.interval = interval
        self._seen: Fingerprint | None = None

    def read(self) -> tuple[SloFile, ...]:
        """Every file, read and checked together; :class:`SloFileError` names what is wrong."""
        files = read_slos(self.directory)
        try:
            ServiceLevels(files)  # the registry's check: do they go together?
        except ValidationError as error:
            raise SloFileError(
                "; ".join(
                    f"{self.directory / problem.path}: {problem.message}"
                    for problem in error.problems
                )
            ) from None
        return files

    def load(self) -> tuple[SloFile, ...]:
        """Read the files at start; :class:`SloFileError` if one is invalid. Returns them."""
        self._seen = _fingerprint(self.directory)
        files = self.read()
        logger.info(
            "SLO files loaded %s",
            log_fields(directory=self.directory, files=len(files)),
        )
        return files

    async def check(self) -> bool:
        """Look at the directory; read it again if it changed. True: new SLOs are in effect.

        An invalid change is logged once (until the files change again) and
        the SLOs in effect are kept whole; a change ``put`` refused is
        logged and tried again at the next look.
        """
        seen = _fingerprint(self.directory)
        if seen == self._seen:
            return False
        try:
            files = self.read()
        except SloFileError as error:
            self._seen = seen
            logger.warning(
                "SLO files not reloaded; the previous ones stay in effect %s",
                log_fields(error=str(error), files_in_effect=len(self.registry.slos)),
            )
            return False
        await self.put(files)  # raises: _seen stays, so the next look tries again
        self._seen = seen
        logger.info(
            "SLO files reloaded %s",
            log_fields(directory=self.directory, files=len(files)),
        )
        return True

    async def run(self) -> None:
        """Check every ``interval`` seconds until cancelled."""
        while True:
            await anyio.sleep(self.interval)
            try:
                await self.check()
            except Exception:
                logger.exception("SLO files check failed; tried again at the next look")


def slo_directory(state_dir: os.PathLike[str] | str) -> pathlib.Path:
    """The SLO files' directory of a state directory: ``STATE_DIR/slos``."""
    return pathlib.Path(state_dir) / SLO_DIRECTORY
