"""Sans-I/O adapters: bytes or frames in, ordered event sequences out.

Everything here is pure: no I/O, no clock, no awaiting. Decoders (``NdjsonDecoder``,
``SseDecoder``, ``JsonBodyDecoder``, ``WebSocketDecoder``) turn what a backend sent into
``Event`` values, chunk by chunk, and never raise on bad input; a route's ``Normaliser``
takes out what is noise; ``compare`` aligns two sequences and classifies each
divergence; a ``Contract`` checks a sequence's event types against a grammar; and
``belongs_to`` decides whether an event may reach a session's user.
"""

from adapters.compare import Comparison, Divergence, DivergenceKind, compare
from adapters.contract import Contract, ContractError, ContractResult
from adapters.events import (
    BINARY_TYPE,
    ERROR_TYPE,
    MAX_EVENT_BYTES,
    RESPONSE_TYPE,
    UNTYPED,
    Event,
    error_event,
)
from adapters.isolation import belongs_to, isolation_violations
from adapters.json_body import JsonBodyDecoder
from adapters.ndjson import NdjsonDecoder
from adapters.normalise import PRESENT, Normaliser
from adapters.sse import SseDecoder
from adapters.websocket import WebSocketDecoder

__all__ = [
    "BINARY_TYPE",
    "ERROR_TYPE",
    "MAX_EVENT_BYTES",
    "PRESENT",
    "RESPONSE_TYPE",
    "UNTYPED",
    "Comparison",
    "Contract",
    "ContractError",
    "ContractResult",
    "Divergence",
    "DivergenceKind",
    "Event",
    "JsonBodyDecoder",
    "NdjsonDecoder",
    "Normaliser",
    "SseDecoder",
    "WebSocketDecoder",
    "belongs_to",
    "compare",
    "error_event",
    "isolation_violations",
]
