"""The batched per-exchange metrics expose exactly what direct Prometheus updates would."""

from __future__ import annotations

import enum

import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from adapters.compare import DivergenceKind
from proxy.metrics import LATENCY_BUCKETS, Metrics, Outcome
from proxy.routing import Backend

# On, just below and just above every bound (Prometheus buckets are "le": a value on a
# bound belongs to it), plus zero, and values past the last bound (+Inf).
VALUES = [0.0, 120.0, 1e9] + [
    value for bound in LATENCY_BUCKETS for value in (bound, bound * 0.999, bound * 1.001)
]


def samples(registry: CollectorRegistry, prefix: str) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    found: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(prefix) and not sample.name.endswith("_created"):
                name = sample.name[len(prefix) :]
                found[(name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_batched_observations_land_in_the_buckets_a_histogram_would_put_them_in() -> None:
    metrics = Metrics()
    reference_registry = CollectorRegistry()
    reference = Histogram(
        "reference",
        "direct observe()",
        ["route", "backend", "role"],
        buckets=LATENCY_BUCKETS,
        registry=reference_registry,
    )
    for index, value in enumerate(VALUES):
        backend = Backend.CANDIDATE if index % 2 else Backend.LEGACY
        metrics.exchange("agent", backend, "primary", Outcome.SUCCESS, value, None)
        reference.labels("agent", backend.value, "primary").observe(value)
    got = samples(metrics.registry, "strangler_request_duration_seconds")
    want = samples(reference_registry, "reference")
    assert got == want
    assert got[("_count", (("backend", "legacy"), ("role", "primary"), ("route", "agent")))] > 0


def test_counts_and_first_events_are_kept_apart_per_route_backend_role_and_outcome() -> None:
    metrics = Metrics()
    metrics.exchange("agent", Backend.LEGACY, "primary", Outcome.SUCCESS, 0.002, 0.001)
    metrics.exchange("agent", Backend.LEGACY, "primary", Outcome.SUCCESS, 0.003, None)
    metrics.exchange("agent", Backend.LEGACY, "primary", Outcome.CLIENT_CLOSED, None, None)
    metrics.exchange("agent", Backend.CANDIDATE, "shadow", Outcome.TIMEOUT, 5.0, 0.2)
    # The enum members and their values are one and the same label set.
    metrics.count_request("agent", "legacy", "primary", "success")
    metrics.observe_first_event("agent", "legacy", "primary", 0.004)
    counts = samples(metrics.registry, "strangler_requests")
    by_labels = {
        (labels["backend"], labels["role"], labels["outcome"]): value
        for (name, pairs), value in counts.items()
        for labels in [dict(pairs)]
        if name == "_total" and labels["route"] == "agent"
    }
    assert by_labels == {
        ("legacy", "primary", "success"): 3.0,
        ("legacy", "primary", "client_closed"): 1.0,
        ("candidate", "shadow", "timeout"): 1.0,
    }
    first = samples(metrics.registry, "strangler_first_event_seconds")
    legacy = (("backend", "legacy"), ("role", "primary"), ("route", "agent"))
    candidate = (("backend", "candidate"), ("role", "shadow"), ("route", "agent"))
    assert first[("_count", legacy)] == 2.0
    assert first[("_sum", legacy)] == 0.005
    assert first[("_count", candidate)] == 1.0
    durations = samples(metrics.registry, "strangler_request_duration_seconds")
    assert durations[("_count", legacy)] == 2.0
    assert durations[("_sum", candidate)] == 5.0
    # A second collection adds nothing: the batch was emptied as it was collected.
    assert samples(metrics.registry, "strangler_requests") == counts


def test_a_batch_held_across_collections_keeps_counting_and_counts_once() -> None:
    # A WebSocket session looks its batch up once and keeps it for all its turns.
    metrics = Metrics()
    held = metrics.batch("agent", "legacy", "primary")
    metrics.first_event_in(held, 0.002)
    metrics.count_request("agent", "legacy", "primary", "success")
    legacy = (("backend", "legacy"), ("role", "primary"), ("route", "agent"))
    first = samples(metrics.registry, "strangler_first_event_seconds")
    assert (first[("_count", legacy)], first[("_sum", legacy)]) == (1.0, 0.002)
    metrics.first_event_in(held, 0.003)
    metrics.observe_first_event("agent", "legacy", "primary", 0.004)  # the same batch
    metrics.exchange("agent", Backend.LEGACY, "primary", Outcome.SUCCESS, 0.01, None)
    first = samples(metrics.registry, "strangler_first_event_seconds")
    assert first[("_count", legacy)] == 3.0
    assert first[("_sum", legacy)] == pytest.approx(0.009)
    assert first[("_bucket", (*legacy[:1], ("le", "0.0025"), *legacy[1:]))] == 1.0
    assert first[("_bucket", (*legacy[:1], ("le", "0.005"), *legacy[1:]))] == 3.0
    requests = samples(metrics.registry, "strangler_requests")
    assert requests[("_total", tuple(sorted((*legacy, ("outcome", "success")))))] == 2.0
    durations = samples(metrics.registry, "strangler_request_duration_seconds")
    assert (durations[("_count", legacy)], durations[("_sum", legacy)]) == (1.0, 0.01)
    # Collected again with nothing new: nothing added.
    assert samples(metrics.registry, "strangler_first_event_seconds") == first
    assert samples(metrics.registry, "strangler_requests") == requests


@pytest.mark.parametrize("kind", [Backend, Outcome, DivergenceKind])
def test_a_label_enum_member_and_its_value_are_one_dict_key(kind: type[enum.StrEnum]) -> None:
    # Members key the per-request dicts (metrics batches, backend URLs) that are also
    # filled or read with plain strings: a member must hash as its value (Enum's own
    # __hash__ hashes the member's name), and does so with str's own hash.
    for member in kind:
        assert hash(member) == hash(member.value)
        assert {member.value: 1}[member] == 1
        assert {member: 1}[member.value] == 1
        assert kind.__hash__ is str.__hash__
