"""A route's experiment: check contracts, compare primary with shadow, count and keep (shell).

Like GitHub Scientist's experiment, it never touches the primary: it receives two
finished observations, normalises both with the route's rules, compares legacy's
sequence (the reference) with the candidate's (the subject), checks each against the
route's event contract, counts the outcome in the metrics and hands mismatches to the
divergence store. In an A/A baseline both sides are legacy: the primary is the reference.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from adapters.compare import Comparison, compare
from adapters.contract import Contract
from adapters.events import Event, error_event
from adapters.normalise import Normaliser
from proxy.divergence_store import DivergenceRecord, DivergenceStore
from proxy.metrics import Metrics
from proxy.observation import Observation
from proxy.routing import Backend, Route

log = logging.getLogger("strangler.experiment")


class RouteExperiment:
    def __init__(
        self,
        route: Route,
        metrics: Metrics,
        store: DivergenceStore | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        compare_settings = route.settings.compare
        self.route = route
        self.metrics = metrics
        self.store = store
        self.clock = clock
        self.normaliser = Normaliser(
            ignore=compare_settings.ignore,
            canonical_ids=compare_settings.canonical_ids,
            coalesce=compare_settings.coalesce,
            presence_only=compare_settings.presence_only,
        )
        contract = route.settings.contract
        self.contract = Contract.parse(contract) if contract else None
        self.error_types = frozenset(route.settings.error_types)
        # Whether exchanges on this route need recording at all: a route that neither
        # shadows nor checks anything is relayed without decoding a byte.
        self.watches = bool(
            route.settings.shadow > 0 or self.contract is not None or route.settings.user_field
        )

    def check_contract(self, observation: Observation) -> bool:
        """Check one sequence against the contract; count a violation per backend."""
        if (
            self.contract is None
            or observation.cancelled
            or observation.timed_out
            or observation.over_limit
        ):
            # A cut-off sequence says nothing about the grammar: the timeout is counted
            # (as a dropped shadow and a timeout divergence), the recording limit as
            # such, not as a contract violation.
            return True
        types = [event.type for event in observation.events]
        result = self.contract.check(types)
        if not result.ok:
            self.metrics.increment(
                self.metrics.contract_violations, self.route.name, observation.backend.value
            )
            # Counted in the metrics; a burst of them (a hanging shadow timing out) must
            # not turn into a burst of log writes on the event loop.
            log.debug(
                "route %s: %s (%s) broke the contract: %s",
                self.route.name,
                observation.backend.value,
                observation.role,
                result.detail,
            )
        return result.ok

    def conclude(
        self, primary: Observation, shadow: Observation | None, turn: int | None = None
    ) -> Comparison | None:
        """Everything the proxy learns from one exchange or turn, once both sides ended.

        A side past the recording limit makes the comparison ``ignored``, as a cancelled
        one does: a sequence too long to hold is no mismatch of the candidate (an
        ``error`` divergence would count against it, and push a rollback, for what may
        be two identical endless streams), and no failure of the comparison either. It is
        counted apart, per side, in ``strangler_recording_limit_total``."""
        route = self.route.name
        self._count_limit(primary)
        self.check_contract(primary)
        if shadow is None:
            return None
        self._count_limit(shadow)
        self.check_contract(shadow)
        if primary.cancelled or shadow.cancelled or primary.over_limit or shadow.over_limit:
            self.metrics.increment(self.metrics.comparisons, route, "ignored")
            return None
        try:
            comparison, reference, subject = self._compare(primary, shadow)
        except Exception:  # a comparison must never take the proxy down
            log.exception("route %s: comparison failed", route)
            self.metrics.increment(self.metrics.comparisons, route, "error")
            return None
        outcome = "match" if comparison.matched else "mismatch"
        metrics = self.metrics
        metrics.increment(metrics.comparisons, route, outcome)
        for divergence in comparison.divergences:
            metrics.increment(metrics.divergences, route, divergence.kind.value)
        if not comparison.matched and self.store is not None:
            ref_obs, subj_obs = (
                (primary, shadow) if self._primary_is_reference(primary) else (shadow, primary)
            )
            self.store.add(
                DivergenceRecord(
                    time=self.clock(),
                    route=route,
                    protocol=self.route.protocol,
                    primary=primary.backend.value,
                    shadow=shadow.backend.value,
                    reference=reference,
                    subject=subject,
                    divergences=comparison.divergences,
                    reference_status=ref_obs.status,
                    subject_status=subj_obs.status,
                    turn=turn,
                )
            )
        return comparison

    def _count_limit(self, observation: Observation) -> None:
        if observation.over_limit:
            metrics = self.metrics
            metrics.increment(
                metrics.recording_limit,
                self.route.name,
                observation.backend.value,
                observation.role,
            )

    @staticmethod
    def _primary_is_reference(primary: Observation) -> bool:
        return primary.backend is Backend.LEGACY

    def _compare(
        self, primary: Observation, shadow: Observation
    ) -> tuple[Comparison, tuple[Event, ...], tuple[Event, ...]]:
        ref_obs, subj_obs = (
            (primary, shadow) if self._primary_is_reference(primary) else (shadow, primary)
        )
        reference = self.normaliser.normalise(_with_failure(ref_obs))
        subject = self.normaliser.normalise(_with_failure(subj_obs))
        comparison = compare(
            reference,
            subject,
            reference_status=ref_obs.status,
            subject_status=subj_obs.status,
            reference_timed_out=ref_obs.timed_out,
            subject_timed_out=subj_obs.timed_out,
            error_types=self.error_types,
        )
        return comparison, reference, subject


def _with_failure(observation: Observation) -> list[Event]:
    """A failed exchange's events end with an error event that says why."""
    if observation.error is None:
        return observation.events
    return [*observation.events, error_event(observation.error)]
