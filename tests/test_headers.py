"""Header hygiene on the parsers' raw headers (pure): what reaches each side."""

from __future__ import annotations

from proxy import headers
from proxy.headers import downstream_response_block, upstream_request_block


def lines(block: bytes) -> list[bytes]:
    return block.split(b"\r\n")[:-1]


def request_lines(
    raw: list[tuple[bytes, bytes]],
    *,
    client_ip: str | None = None,
    proto: str = "http",
    host: str | None = None,
    websocket: bool = False,
) -> list[bytes]:
    block = upstream_request_block(
        raw, client_ip=client_ip, proto=proto, host=host, websocket=websocket
    )
    return lines(block)


def test_the_request_keeps_end_to_end_headers_and_loses_the_rest_in_any_case() -> None:
    got = request_lines(
        [
            (b"Host", b"example.test"),
            (b"X-User-Id", b"u1"),
            (b"CONNECTION", b"Keep-Alive, X-Secret"),
            (b"keep-alive", b"timeout=5"),
            (b"x-secret", b"hop"),
            (b"X-Strangler-Backend", b"candidate"),
            (b"x-STRANGLER-shadow", b"1"),
            (b"Content-Length", b"2"),
            (b"TE", b"trailers"),
            (b"X-Forwarded-For", b"10.0.0.1"),
            (b"Accept", b"*/*"),
        ],
        client_ip="127.0.0.1",
        host="example.test",
    )
    assert got == [
        b"X-User-Id: u1",
        b"Accept: */*",
        b"X-Forwarded-For: 10.0.0.1, 127.0.0.1",
        b"X-Forwarded-Proto: http",
        b"X-Forwarded-Host: example.test",
    ]


def test_a_connection_header_that_names_x_forwarded_for_drops_the_clients_chain() -> None:
    got = request_lines(
        [(b"Connection", b"x-forwarded-for"), (b"X-Forwarded-For", b"10.0.0.1")],
        client_ip="127.0.0.1",
        proto="https",
    )
    assert got == [b"X-Forwarded-For: 127.0.0.1", b"X-Forwarded-Proto: https"]


def test_the_websocket_handshake_headers_stay_out_of_the_upstream_request() -> None:
    raw = [(b"Sec-WebSocket-Key", b"abc"), (b"Upgrade", b"websocket"), (b"Accept", b"*/*")]
    assert b"Sec-WebSocket-Key: abc" in request_lines(raw)
    assert request_lines(raw, websocket=True) == [b"Accept: */*", b"X-Forwarded-Proto: http"]


def test_the_response_loses_hop_by_hop_and_proxy_headers_and_gives_its_length_apart() -> None:
    block, length = downstream_response_block(
        [
            (b"Content-Type", b"application/x-ndjson"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Connection", b"close, X-Debug"),
            (b"X-Debug", b"1"),
            (b"x-strangler-backend", b"forged"),
            (b"Content-Length", b"42"),
            (b"Host", b"kept: not a hop-by-hop header on a response"),
        ],
        "legacy",
    )
    assert length == b"42"
    assert lines(block) == [
        b"Content-Type: application/x-ndjson",
        b"Host: kept: not a hop-by-hop header on a response",
        b"X-Strangler-Backend: legacy",
    ]


def test_header_names_past_the_cache_bound_are_still_cleaned() -> None:
    # A client chooses its header names: the classification cache stops growing at its
    # bound, and a name classified without it is cleaned the same.
    for index in range(headers._KINDS_MAX + 100):
        request_lines([(b"X-Filler-%d" % index, b"v")])
    assert len(headers._KINDS) <= headers._KINDS_MAX
    got = request_lines(
        [
            (b"X-Strangler-Never-Seen", b"forged"),
            (b"Proxy-Authorization", b"secret"),
            (b"X-Never-Seen", b"kept"),
        ]
    )
    assert got == [b"X-Never-Seen: kept", b"X-Forwarded-Proto: http"]


def test_content_length_lines_are_right_past_the_cache_bound() -> None:
    # A body's length is the peer's to choose: the cache of lines stops growing at its
    # bound, and a length past it still gets its own line.
    for size in range(headers._LENGTH_LINES_MAX + 100):
        assert headers.length_line(size) == b"Content-Length: %d\r\n" % size
    assert len(headers._LENGTH_LINES) <= headers._LENGTH_LINES_MAX
    assert headers.length_line(10**12) == b"Content-Length: 1000000000000\r\n"
    assert headers.length_line(0) == b"Content-Length: 0\r\n"


# --- wire text ------------------------------------------------------------------------


def test_wire_text_is_utf_8_with_any_other_byte_kept_and_given_back() -> None:
    for raw in (b"user-1", "Zoë 🚀".encode(), b"\xff\xfe latin \xe9", b"\xed\xa0\x80", b""):
        text = headers.from_wire(raw)
        assert text == raw.decode("utf-8", "surrogateescape")
        assert headers.to_wire(text) == raw
    assert headers.from_wire("Zoë".encode()) == "Zoë"
    # Text that did not come from bytes still encodes as UTF-8.
    assert headers.to_wire("Zoë") == "Zoë".encode()
