"""A shared registry's settings: the SLO files and the access policy, published by the lease holder.

With ``--redis`` every controller routes under the registry's SLO files and
access policy (``--policy``, ``--trust-domain``): they are changes of the
registry like any other (``slos_changed``, ``policy_changed``), in the
stream and in its snapshot, so every replica and every follower answers
alike. One controller decides them, the holder of the sweeper lease
(DESIGN, "What a snapshot holds"): it reads its own files (with the SLO
watcher and the policy file's watcher, as a controller on a journal does)
and publishes them where they differ from the registry's, when it takes
the lease (at start, or over from another controller) and whenever its
files change. The store's script drops a setting whose writer no longer
holds the lease, so a paused holder cannot overwrite its successor's.

Every other controller reads its files too and compares them with the
registry's, at start, when its files change and when the registry's
change: where they differ it logs one warning naming the directory or the
flag (again only when what differs changes, not at every look) and routes
under the registry's. A controller without a state directory reads no SLO
files: it publishes none and compares none.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Awaitable, Callable

import anyio

from crank_registry import AccessRules, CapabilityRegistry, ServiceLevels, SloFile

from .effects import log_fields
from .http import ApiError

__all__ = ["SharedSettings"]

logger = logging.getLogger("crank_registry_asgi.shared_settings")


class SharedSettings:
    """Publishes this controller's SLO files and access policy while it holds the lease.

    ``access_rules`` is this controller's own access policy, as read at
    start; its SLO files come with :meth:`start` (none without a state
    directory: no SLO files of its own); the watchers hand on later
    versions with :meth:`put_slos` and :meth:`put_access_rules`.
    ``holds_lease`` says whether this controller
    holds the sweeper lease; ``publish_slos`` and ``publish_access_rules``
    make the registry's change (decided, written, applied) and raise
    :class:`ApiError` when the store cannot take it. ``slo_directory`` and
    ``policy_file`` name the sources in the warnings.

    :meth:`start` once the store is open, :meth:`run` while serving (it
    settles again each time :meth:`wake` is called: the lease was taken),
    :meth:`compare` whenever the registry applied changes.
    """

    def __init__(
        self,
        registry: CapabilityRegistry,
        *,
        access_rules: AccessRules,
        holds_lease: Callable[[], bool],
        publish_slos: Callable[[tuple[SloFile, ...]], Awaitable[None]],
        publish_access_rules: Callable[[AccessRules], Awaitable[None]],
        slo_directory: pathlib.Path | None,
        policy_file: pathlib.Path | None,
    ) -> None:
        self.registry = registry
        #: This controller's SLO files (``None``: it reads none).
        self.slos: tuple[SloFile, ...] | None = None
        self.access_rules = access_rules
        self.holds_lease = holds_lease
        self.publish_slos = publish_slos
        self.publish_access_rules = publish_access_rules
        self.slo_directory = slo_directory
        self.policy_file = policy_file
        self._woken = anyio.Event()
        # Nothing is compared before the first settle: a first controller
        # takes the lease and publishes, it must not warn before it could.
        self._settled = False
        # The difference last warned about, per setting (None: they agreed).
        self._slo_warning: str | None = None
        self._policy_warning: str | None = None

    async def start(self, slos: tuple[SloFile, ...] | None) -> None:
        """With this controller's SLO files as read at start: publish, or compare.

        A change the store could not take is logged; it is published when
        the lease is taken again.
        """
        self.slos = None if slos is None else ServiceLevels(slos).files
        await self._settle_logged()

    def wake(self) -> None:
        """Settle again soon: this controller just took the sweeper lease."""
        self._woken.set()

    async def put_slos(self, files: tuple[SloFile, ...]) -> None:
        """New SLO files were read here: publish them (lease holder) or compare them.

        Raises :class:`ApiError` when the store could not take them (the
        watcher tries again at its next look).
        """
        self.slos = ServiceLevels(files).files
        if self.holds_lease():
            await self.publish_slos(self.slos)
        self._compare_slos()

    async def put_access_rules(self, rules: AccessRules) -> None:
        """A new access policy was read here: publish it (lease holder) or compare it.

        Raises :class:`ApiError` like :meth:`put_slos`.
        """
        self.access_rules = rules
        if self.holds_lease():
            await self.publish_access_rules(rules)
        self._compare_policy()

    async def settle(self) -> None:
        """The lease holder publishes what differs; any other controller compares.

        Raises :class:`ApiError` when the store could not take a change.
        """
        self._settled = True
        if self.holds_lease():
            await self.publish_access_rules(self.access_rules)
            if self.slos is not None:
                await self.publish_slos(self.slos)
        self.compare()

    async def run(self) -> None:
        """Settle each time the lease is taken, until cancelled."""
        while True:
            await self._woken.wait()
            self._woken = anyio.Event()
            await self._settle_logged()

    async def _settle_logged(self) -> None:
        try:
            await self.settle()
        except ApiError as error:
            # The lease goes with the store: it is taken again, and this
            # woken again, once the store answers.
            logger.warning(
                "settings not published; tried again when the lease is taken again %s",
                log_fields(error=error.message),
            )

    def compare(self) -> None:
        """Log (once per difference) where this controller's settings differ from the registry's."""
        if self._settled:
            self._compare_slos()
            self._compare_policy()

    def _compare_slos(self) -> None:
        own = self.slos
        if own is None or self.holds_lease():  # the holder publishes, it does not compare
            return
        theirs = self.registry.slos
        difference = None if own == theirs else _slo_difference(own, theirs)
        if difference == self._slo_warning:
            return
        if difference is not None:
            logger.warning(
                "the SLO files in %s differ from the shared registry's (published by the "
                "sweeper lease holder); this controller routes under the registry's %s",
                self.slo_directory,
                difference,
            )
        else:
            logger.info(
                "the SLO files in %s agree with the shared registry's again", self.slo_directory
            )
        self._slo_warning = difference

    def _compare_policy(self) -> None:
        if self.holds_lease():
            return
        own = self.access_rules
        theirs = self.registry.access_rules
        difference = None if own == theirs else self._policy_difference(own, theirs)
        if difference == self._policy_warning:
            return
        if difference is not None:
            logger.warning(
                "the access policy of %s differs from the shared registry's (published by the "
                "sweeper lease holder); this controller routes under the registry's %s",
                self._policy_source(own, theirs),
                difference,
            )
        else:
            logger.info("the access policy agrees with the shared registry's again")
        self._policy_warning = difference

    def _policy_source(self, own: AccessRules, theirs: AccessRules | None) -> str:
        """The flags whose values differ: ``--trust-domain``, ``--policy FILE``, or both."""
        names = []
        if theirs is None or own.trust_domain != theirs.trust_domain:
            names.append(f"--trust-domain {own.trust_domain}")
        if theirs is None or (own.rules, own.default) != (theirs.rules, theirs.default):
            names.append(
                f"--policy {self.policy_file}" if self.policy_file is not None else "no --policy"
            )
        return " and ".join(names)

    @staticmethod
    def _policy_difference(own: AccessRules, theirs: AccessRules | None) -> str:
        return log_fields(
            here=_describe_rules(own),
            registry="none" if theirs is None else _describe_rules(theirs),
        )


def _describe_rules(rules: AccessRules) -> str:
    return f"{len(rules.rules)} rules, default {rules.default}, trust domain {rules.trust_domain}"


def _slo_difference(own: tuple[SloFile, ...], theirs: tuple[SloFile, ...]) -> str:
    """Which files are only here, only in the registry, or not the same (``key=value``)."""
    mine = {slo.file: slo for slo in own}
    registry = {slo.file: slo for slo in theirs}
    return log_fields(
        only_here=",".join(sorted(mine.keys() - registry.keys())) or "none",
        only_in_registry=",".join(sorted(registry.keys() - mine.keys())) or "none",
        not_the_same=",".join(
            sorted(name for name in mine.keys() & registry.keys() if mine[name] != registry[name])
        )
        or "none",
    )
