"""The fuzzer's inputs: valid seeds and the mutations made of them, from one seed (pure).

An HTTP case is the bytes one client connection sends, cut into writes; a WebSocket case
is a handshake and a sequence of frames sent after it. Both start from seeds that
exercise one thing each (a method, a framing, pipelining, ``Expect``, an upgrade, an
absolute-form target, odd Hosts and user ids, the classic smuggling shapes) and are then
mutated: bytes flipped, inserted, deleted, spliced from another seed; header lines
duplicated; framing headers added; line ends changed; the input truncated; frames
unmasked, given reserved bits, bad opcodes, lying lengths. Everything comes from a
``random.Random`` seeded once, so a seed names a run exactly. A case carries its seed's
name and the mutations made, so that a failure names what was sent.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.fuzz_wire import build_frame

HOST = b"Host: proxy.test\r\n"
ROUTES = (b"/fz/json", b"/fz/ndjson", b"/fz/sse")
WS_ROUTES = (b"/fz/ws/watched", b"/fz/ws/direct")
MAX_BODY = 16 * 1024  # the proxy's server.max_body_bytes in the fuzz configuration
MAX_WS_MESSAGE = 4096  # its server.max_ws_message_bytes


@dataclass(frozen=True)
class Expected:
    """A request a valid seed makes, as a backend must receive it."""

    method: bytes
    target: bytes
    body: bytes


@dataclass
class HttpCase:
    number: int
    seed: str
    writes: list[bytes]
    mutations: list[str] = field(default_factory=list)
    # For an unmutated valid seed: the requests the backend must receive, in order,
    # each answered to the client.
    expected: list[Expected] | None = None

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)

    @property
    def name(self) -> str:
        done = ", ".join(self.mutations) or "unmutated"
        return f"http case {self.number} ({self.seed}; {done})"


@dataclass
class WsCase:
    number: int
    seed: str
    route: bytes
    handshake: bytes
    frames: list[bytes]
    mutations: list[str] = field(default_factory=list)
    complete: bool = True  # every frame is whole and ends the session with a close

    @property
    def data(self) -> bytes:
        return b"".join(self.frames)

    @property
    def name(self) -> str:
        done = ", ".join(self.mutations) or "unmutated"
        return f"ws case {self.number} ({self.seed} on {self.route.decode()}; {done})"


# --- HTTP seeds ----------------------------------------------------------------------


def _head(
    method: bytes,
    target: bytes,
    *lines: bytes,
    version: bytes = b"HTTP/1.1",
    host: bytes | None = HOST,
) -> bytes:
    return b"%b %b %b\r\n%b%b\r\n" % (method, target, version, host or b"", b"".join(lines))


def _user(number: int) -> bytes:
    return b"X-User-Id: user-%d\r\n" % number


def _cl(body: bytes) -> bytes:
    return b"Content-Length: %d\r\n" % len(body)


def _chunked(body: bytes, pieces: int = 3) -> bytes:
    size = max(1, len(body) // pieces)
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    encoded = b"".join(b"%x\r\n%b\r\n" % (len(part), part) for part in parts)
    return encoded + b"0\r\n\r\n"


CLOSE = b"Connection: close\r\n"
SMUGGLED = b"GET /fz/json/SMUGGLED HTTP/1.1\r\nHost: proxy.test\r\n\r\n"


@dataclass(frozen=True)
class Seed:
    name: str
    writes: list[bytes]
    expected: list[Expected] | None


SeedMaker = Callable[[int, random.Random], Seed]


def _valid(name: str, *requests: tuple[bytes, Expected]) -> Seed:
    return Seed(name, [b"".join(raw for raw, _ in requests)], [e for _, e in requests])


def _get(n: int, r: random.Random) -> Seed:
    route = r.choice(ROUTES)
    target = b"%b/%d?q=%d" % (route, n, r.randrange(100))
    return _valid("get", (_head(b"GET", target, _user(n), CLOSE), Expected(b"GET", target, b"")))


def _head_request(n: int, r: random.Random) -> Seed:
    target = b"%b/%d" % (r.choice(ROUTES), n)
    return _valid("head", (_head(b"HEAD", target, _user(n), CLOSE), Expected(b"HEAD", target, b"")))


def _options(n: int, r: random.Random) -> Seed:
    target = b"/fz/json/%d" % n
    raw = _head(b"OPTIONS", target, _user(n), CLOSE)
    return _valid("options", (raw, Expected(b"OPTIONS", target, b"")))


def _body(n: int, r: random.Random) -> bytes:
    return b'{"case": %d, "pad": "%b"}' % (n, b"x" * r.randrange(0, 300))


def _post_length(n: int, r: random.Random) -> Seed:
    target, body = b"/fz/json/%d" % n, _body(n, r)
    raw = _head(b"POST", target, _user(n), _cl(body), CLOSE) + body
    return _valid("post-content-length", (raw, Expected(b"POST", target, body)))


def _post_chunked(n: int, r: random.Random) -> Seed:
    target, body = b"/fz/json/%d" % n, _body(n, r)
    raw = _head(b"POST", target, _user(n), b"Transfer-Encoding: chunked\r\n", CLOSE)
    return _valid("post-chunked", (raw + _chunked(body), Expected(b"POST", target, body)))


def _pipelined(n: int, r: random.Random) -> Seed:
    body = _body(n, r)
    first, second, third = (b"/fz/json/%d/%d" % (n, i) for i in range(3))
    return _valid(
        "pipelined",
        (_head(b"GET", first, _user(n)), Expected(b"GET", first, b"")),
        (_head(b"POST", second, _user(n), _cl(body)) + body, Expected(b"POST", second, body)),
        (_head(b"HEAD", third, _user(n), CLOSE), Expected(b"HEAD", third, b"")),
    )


def _expect_continue(n: int, r: random.Random) -> Seed:
    target, body = b"/fz/json/%d" % n, _body(n, r)
    head = _head(b"POST", target, _user(n), _cl(body), b"Expect: 100-continue\r\n", CLOSE)
    return Seed("expect-continue", [head, body], [Expected(b"POST", target, body)])


def _absolute_form(n: int, r: random.Random) -> Seed:
    path = b"/fz/json/%d" % n
    raw = _head(b"GET", b"http://proxy.test" + path, _user(n), CLOSE)
    return _valid("absolute-form", (raw, Expected(b"GET", path, b"")))


def _http10(n: int, r: random.Random) -> Seed:
    target = b"/fz/json/%d" % n
    raw = _head(b"GET", target, _user(n), version=b"HTTP/1.0")
    return _valid("http-1.0", (raw, Expected(b"GET", target, b"")))


def _utf8_user(n: int, r: random.Random) -> Seed:
    target = b"/fz/json/%d" % n
    raw = _head(b"GET", target, "X-User-Id: é-%d\r\n".encode() % n, CLOSE)
    return _valid("utf8-user-id", (raw, Expected(b"GET", target, b"")))


def _hop_by_hop(n: int, r: random.Random) -> Seed:
    target = b"/fz/json/%d" % n
    raw = _head(
        b"GET",
        target,
        _user(n),
        b"Connection: close, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\n",
        b"TE: trailers\r\nProxy-Authorization: Basic eDp5\r\nUpgrade: h2c\r\n",
        b"X-Strangler-Shadow: 1\r\nX-Strangler-Backend: candidate\r\nX-Strangler-X: 1\r\n",
        b"X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Host: evil.test\r\n",
    )
    return _valid("hop-by-hop", (raw, Expected(b"GET", target, b"")))


def _odd(name: str, raw: bytes) -> Seed:
    """A seed whose answer is the proxy's to choose: only the invariants hold for it."""
    return Seed(name, [raw], None)


def _non_utf8_user(n: int, r: random.Random) -> Seed:
    user = r.choice([b"a\x80", b"\xff\xfe", b"user-\xc3", b"\xed\xa0\x80"])
    return _odd("non-utf8-user-id", _head(b"GET", b"/fz/json/%d" % n, b"X-User-Id: %b\r\n" % user))


def _odd_user(n: int, r: random.Random) -> Seed:
    user = r.choice([b"", b" ", b"x" * 4000, b"a\tb", b"\"'<>", b"%00", b"a,b"])
    return _odd("odd-user-id", _head(b"GET", b"/fz/json/%d" % n, b"X-User-Id: %b\r\n" % user))


def _odd_host(n: int, r: random.Random) -> Seed:
    target = b"/fz/json/%d" % n
    choice = r.randrange(7)
    if choice == 0:
        return _odd("no-host", _head(b"GET", target, _user(n), host=None))
    if choice == 1:
        return _odd("two-hosts", _head(b"GET", target, _user(n), b"Host: other.test\r\n"))
    host = [b"", b"[::1]:8080", b"a_b", b"a b", b"x" * 300, b"proxy.test:99999"][choice - 1]
    return _odd("odd-host", _head(b"GET", target, _user(n), host=b"Host: %b\r\n" % host))


def _odd_target(n: int, r: random.Random) -> Seed:
    line = r.choice(
        [
            b"GET * HTTP/1.1",
            b"OPTIONS * HTTP/1.1",
            b"GET ftp://proxy.test/fz/json HTTP/1.1",
            b"GET http://other.test:81?x=1 HTTP/1.1",
            b"GET fz/json HTTP/1.1",
            b"GET /fz/json/%2e%2e/%00 HTTP/1.1",
            b"GET /fz/json/" + b"a" * 9000 + b" HTTP/1.1",
            b"CONNECT proxy.test:443 HTTP/1.1",
            b"GET /fz/json HTTP/2.0",
            b"GET /fz/json HTTP/1.2",
            b"GET /fz/json HTTP/0.9",
            b"GET /fz/json",
            b"get /fz/json HTTP/1.1",
            b"GET  /fz/json HTTP/1.1",
            b"PRI * HTTP/2.0",
        ]
    )
    return _odd("odd-request-line", line + b"\r\n" + HOST + _user(n) + b"\r\n")


def _smuggling(n: int, r: random.Random) -> Seed:
    inner = SMUGGLED
    body = b"0\r\n\r\n" + inner
    shape = r.choice(
        [
            b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % len(body),
            b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n" % len(body),
            b"Content-Length: 0\r\nContent-Length: %d\r\n" % len(body),
            b"Content-Length: %d, %d\r\n" % (len(body), len(body)),
            b"Content-Length: +%d\r\n" % len(body),
            b"Transfer-Encoding: xchunked\r\n",
            b"Transfer-Encoding: chunked, identity\r\n",
            b"Transfer-Encoding: identity, chunked\r\n",
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
            b"Transfer-Encoding : chunked\r\n",
            b"Transfer-Encoding:\tchunked\r\n",
            b"X-Pad: 1\r\n Transfer-Encoding: chunked\r\n",
            b"Transfer-Encoding: chunked\r\n\tidentity\r\n",
            b"Transfer-Encoding\x00: chunked\r\n",
            b"Content-Length\r\n : 5\r\n",
        ]
    )
    raw = _head(b"POST", b"/fz/json/%d" % n, _user(n), shape) + body
    return _odd("smuggling", raw)


def _bad_chunks(n: int, r: random.Random) -> Seed:
    body = r.choice(
        [
            b"ffffffffffffffff1\r\nx\r\n0\r\n\r\n",
            b"5;ext\nx\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b"5 \r\nhello\r\n0\r\n\r\n",
            b"3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n",
            b"3\r\nabc\r\n0\r\nContent-Length: 99\r\n\r\n",
            b"3\r\nabc\r\n0\r\n\r\n" + SMUGGLED,
        ]
    )
    head = _head(b"POST", b"/fz/json/%d" % n, _user(n), b"Transfer-Encoding: chunked\r\n")
    return _odd("bad-chunks", head + body)


def _bad_lines(n: int, r: random.Random) -> Seed:
    target = b"/fz/json/%d" % n
    choice = r.randrange(7)
    if choice == 0:
        return _odd("obs-fold", _head(b"GET", target, _user(n), b"X-A: 1\r\n  folded\r\n"))
    if choice == 1:
        raw = _head(b"GET", target, _user(n)).replace(b"\r\n", b"\n")
        return _odd("bare-lf", raw)
    if choice == 2:
        return _odd("nul", _head(b"GET", target, _user(n), b"X-A: a\x00b\r\n"))
    if choice == 3:
        return _odd("long-line", _head(b"GET", target, _user(n), b"X-A: " + b"a" * 70000 + b"\r\n"))
    if choice == 4:
        many = b"".join(b"X-H%d: %d\r\n" % (i, i) for i in range(300))
        return _odd("many-headers", _head(b"GET", target, _user(n), many))
    if choice == 5:
        return _odd("bare-cr", _head(b"GET", target, _user(n), b"X-A: a\rb\r\n"))
    return _odd("space-before-colon", _head(b"GET", target, _user(n), b"X-A : 1\r\n"))


def _truncated(n: int, r: random.Random) -> Seed:
    body = _body(n, r)
    raw = _head(b"POST", b"/fz/json/%d" % n, _user(n), _cl(body)) + body
    return _odd("truncated", raw[: r.randrange(1, len(raw))])


def _too_large(n: int, r: random.Random) -> Seed:
    body = b"z" * (MAX_BODY + 1)
    head = _head(b"POST", b"/fz/json/%d" % n, _user(n), _cl(body))
    if r.random() < 0.5:
        head = _head(b"POST", b"/fz/json/%d" % n, _user(n), b"Transfer-Encoding: chunked\r\n")
        return _odd("body-too-large", head + _chunked(body, 4))
    return _odd("body-too-large", head + body)


def _upgrade(n: int, r: random.Random) -> Seed:
    raw = _head(
        b"GET",
        b"%b/%d" % (r.choice(WS_ROUTES), n),
        _user(n),
        b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
    )
    return _odd("upgrade", raw)


def _other_methods(n: int, r: random.Random) -> Seed:
    method = r.choice([b"PUT", b"DELETE", b"PATCH", b"TRACE", b"GET"])
    target, body = b"/fz/json/%d" % n, _body(n, r)
    raw = _head(method, target, _user(n), _cl(body), CLOSE) + body
    return _valid("method-with-body", (raw, Expected(method, target, body)))


def _unrouted(n: int, r: random.Random) -> Seed:
    target = b"/elsewhere/%d" % n
    return _valid(
        "unrouted", (_head(b"GET", target, _user(n), CLOSE), Expected(b"GET", target, b""))
    )


HTTP_SEEDS: tuple[SeedMaker, ...] = (
    _get,
    _head_request,
    _options,
    _post_length,
    _post_chunked,
    _pipelined,
    _expect_continue,
    _absolute_form,
    _http10,
    _utf8_user,
    _hop_by_hop,
    _other_methods,
    _unrouted,
    _non_utf8_user,
    _odd_user,
    _odd_host,
    _odd_target,
    _smuggling,
    _bad_chunks,
    _bad_lines,
    _truncated,
    _too_large,
    _upgrade,
)

# --- HTTP mutations ------------------------------------------------------------------

INTERESTING = (
    b"\r",
    b"\n",
    b"\r\n",
    b"\x00",
    b" ",
    b"\t",
    b":",
    b"\x80",
    b"\xff",
    b"0",
    b"9",
    b"-",
    b",",
    b";",
    b"\x7f",
    b"\r\n\r\n",
    b"\r\n ",
)
FRAMING_LINES = (
    b"Content-Length: 0\r\n",
    b"Content-Length: 7\r\n",
    b"Content-Length: 99999999999999999999\r\n",
    b"Content-Length: -1\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
    b"Expect: 100-continue\r\n",
    b"Connection: keep-alive\r\n",
    b"Connection: close\r\n",
    b"Connection: Upgrade\r\nUpgrade: websocket\r\n",
    b"Host: second.test\r\n",
    b"X-User-Id: other\r\n",
    b"X-User-Id: \x80\x81\r\n",
    b"X-Strangler-Shadow: 1\r\n",
)


def _line_starts(data: bytes) -> list[int]:
    starts, at = [], data.find(b"\n")
    while at != -1 and at + 1 < len(data):
        starts.append(at + 1)
        at = data.find(b"\n", at + 1)
    return starts or [0]


def mutate(data: bytes, r: random.Random, donors: list[bytes]) -> tuple[bytes, str]:
    """One mutation of ``data``, and what it did."""
    if not data:
        return b"GET / HTTP/1.1\r\n\r\n", "replaced empty"
    kind = r.randrange(11)
    at = r.randrange(len(data))
    if kind == 0:
        bit = 1 << r.randrange(8)
        return data[:at] + bytes([data[at] ^ bit]) + data[at + 1 :], f"flip bit {bit} at {at}"
    if kind == 1:
        piece = r.choice(INTERESTING)
        return data[:at] + piece + data[at:], f"insert {piece!r} at {at}"
    if kind == 2:
        span = r.randrange(1, 16)
        return data[:at] + data[at + span :], f"delete {span} at {at}"
    if kind == 3:
        donor = r.choice(donors)
        start = r.randrange(len(donor))
        piece = donor[start : start + r.randrange(1, 200)]
        return data[:at] + piece + data[at:], f"splice {len(piece)} bytes at {at}"
    if kind == 4:
        starts = _line_starts(data)
        start = r.choice(starts)
        end = data.find(b"\n", start)
        line = data[start : end + 1] if end != -1 else data[start:]
        return data[:start] + line + data[start:], f"duplicate line at {start}"
    if kind == 5:
        start = r.choice(_line_starts(data))
        piece = r.choice(FRAMING_LINES)
        return data[:start] + piece + data[start:], f"add {piece!r} at {start}"
    if kind == 6:
        ends = [i for i in range(len(data) - 1) if data[i : i + 2] == b"\r\n"]
        if ends:
            end = r.choice(ends)
            replacement = r.choice([b"\n", b"\r", b"\r\r\n", b"\n\r"])
            return data[:end] + replacement + data[end + 2 :], f"line end {replacement!r} at {end}"
        return data, "no line end"
    if kind == 7:
        return data[:at], f"truncate at {at}"
    if kind == 8:
        start = r.choice(_line_starts(data))
        colon = data.find(b":", start)
        if colon != -1:
            name = data[start:colon]
            return data[:start] + name.swapcase() + data[colon:], f"case of line at {start}"
        return data, "no header"
    if kind == 9:
        filler = b"a" * r.choice([100, 5000, 70000])
        return data[:at] + filler + data[at:], f"insert {len(filler)} filler at {at}"
    # Repeat the whole input: pipelining of whatever it is.
    return data + data, "doubled"


def http_cases(seed: int, count: int) -> list[HttpCase]:
    r = random.Random(seed)
    cases = []
    donors = [maker(0, random.Random(i)).writes[0] for i, maker in enumerate(HTTP_SEEDS)]
    for number in range(count):
        maker = HTTP_SEEDS[r.randrange(len(HTTP_SEEDS))]
        made = maker(number, r)
        case = HttpCase(number, made.name, list(made.writes))
        if r.random() < 0.15:
            case.expected = made.expected  # unmutated: valid seeds are served exactly
        else:
            data = case.data
            for _ in range(r.choice((1, 1, 2, 3))):
                data, what = mutate(data, r, donors)
                case.mutations.append(what)
            case.writes = [data]
        case.writes = _split(case.writes, r)
        cases.append(case)
    return cases


def _split(writes: list[bytes], r: random.Random) -> list[bytes]:
    """The same bytes over more writes, cut at random points (sometimes one byte long)."""
    out = []
    for data in writes:
        times = r.choice((0, 0, 1, 2, 4)) if len(data) > 1 else 0
        cuts = sorted({r.randrange(1, len(data)) for _ in range(times)})
        start = 0
        for cut in [*cuts, len(data)]:
            out.append(data[start:cut])
            start = cut
    return [part for part in out if part]


# --- WebSocket -----------------------------------------------------------------------


def ws_handshake(route: bytes, number: int, user: bytes | None = None) -> bytes:
    user_line = b"X-User-Id: %b\r\n" % (user if user is not None else b"ws-%d" % number)
    return _head(
        b"GET",
        b"%b/%d" % (route, number),
        user_line,
        b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
    )


@dataclass
class _Spec:
    opcode: int
    payload: bytes
    fin: bool = True
    rsv: int = 0
    masked: bool = True
    declared: int | None = None


def _close(code: int = 1000, reason: bytes = b"bye") -> _Spec:
    return _Spec(0x8, struct.pack("!H", code) + reason)


def _ws_seed(r: random.Random, n: int) -> tuple[str, list[_Spec]]:
    text = b"hello %d" % n
    choice = r.randrange(6)
    if choice == 0:
        return "text", [_Spec(0x1, text), _close()]
    if choice == 1:
        return "binary", [_Spec(0x2, bytes(r.randrange(256) for _ in range(40))), _close()]
    if choice == 2:
        return "ping", [_Spec(0x9, b"p"), _Spec(0x1, text), _close()]
    if choice == 3:
        parts = [_Spec(0x1, b"frag-", fin=False), _Spec(0x0, b"ment-", fin=False)]
        return "fragmented", [*parts, _Spec(0x9, b"mid"), _Spec(0x0, b"end"), _close()]
    if choice == 4:
        return "utf8", [_Spec(0x1, "héllo ✓".encode()), _close(1000, "fin ✓".encode())]
    return "several", [_Spec(0x1, text), _Spec(0x2, b"\x00\x01"), _Spec(0x1, b""), _close()]


BAD_CLOSE_CODES = (0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2999, 5000, 65535)


def _ws_mutate(specs: list[_Spec], r: random.Random) -> tuple[str, bool]:
    """One frame-level mutation; returns what it did and whether the frames stay whole."""
    target = r.randrange(len(specs))
    spec = specs[target]
    kind = r.randrange(14)
    if kind == 0:
        spec.masked = False
        return f"unmasked frame {target}", True
    if kind == 1:
        spec.rsv = r.randrange(1, 8)
        return f"rsv {spec.rsv} on frame {target}", True
    if kind == 2:
        spec.opcode = r.choice([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
        return f"opcode {spec.opcode} on frame {target}", True
    if kind == 3:
        specs.insert(target, _Spec(0x9, b"frag", fin=False))
        return f"fragmented ping before {target}", True
    if kind == 4:
        specs.insert(target, _Spec(r.choice([0x9, 0xA]), b"p" * r.choice([126, 200, 1000])))
        return f"oversize control frame before {target}", True
    if kind == 5:
        bad = r.choice([b"\xff", b"\xc3", b"a\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"])
        specs.insert(target, _Spec(0x1, b"text" + bad))
        return f"invalid UTF-8 text {bad!r} before {target}", True
    if kind == 6:
        code = r.choice(BAD_CLOSE_CODES)
        specs[:] = [*specs[:target], _close(code, b"")]
        return f"close code {code} at {target}", True
    if kind == 7:
        specs[:] = [*specs[:target], _Spec(0x8, b"\x03")]
        return f"1-byte close at {target}", True
    if kind == 8:
        specs[:] = [*specs[:target], _Spec(0x8, struct.pack("!H", 1000) + b"\xff\xfe")]
        return f"close reason not UTF-8 at {target}", True
    if kind == 9:
        specs.insert(target, _Spec(0x1, b"one", fin=False))
        specs.insert(target + 1, _Spec(0x1, b"two"))
        return f"interleaved fragments at {target}", True
    if kind == 10:
        specs.insert(target, _Spec(0x0, b"orphan"))
        return f"continuation without a start at {target}", True
    if kind == 11:
        declared = r.choice([1 << 31, (1 << 63) - 1, 1 << 62, MAX_WS_MESSAGE * 4])
        specs[:] = [*specs[:target], _Spec(r.choice([0x1, 0x2]), b"x" * 10, declared=declared)]
        return f"declared length {declared} at {target}", False
    if kind == 12:
        specs.insert(target, _Spec(0x2, b"b" * (MAX_WS_MESSAGE + 1)))
        return f"message over the limit before {target}", True
    specs.insert(target, _Spec(0x1, b"big-", fin=False))
    specs.insert(target + 1, _Spec(0x0, b"b" * MAX_WS_MESSAGE))
    return f"fragmented message over the limit at {target}", True


def ws_cases(seed: int, count: int) -> list[WsCase]:
    r = random.Random(seed ^ 0x5EED)
    cases = []
    for number in range(count):
        route = WS_ROUTES[number % 2]
        name, specs = _ws_seed(r, number)
        case = WsCase(number, name, route, ws_handshake(route, number), [])
        if r.random() < 0.02:
            case.handshake = ws_handshake(route, number, b"ws-\x80")
            case.mutations.append("user id not UTF-8")
        if r.random() > 0.1:
            for _ in range(r.choice((1, 1, 2, 3))):
                what, whole = _ws_mutate(specs, r)
                case.mutations.append(what)
                case.complete = case.complete and whole
        frames = [
            build_frame(
                s.opcode,
                s.payload,
                fin=s.fin,
                rsv=s.rsv,
                mask=bytes(r.randrange(256) for _ in range(4)) if s.masked else None,
                declared=s.declared,
            )
            for s in specs
        ]
        if r.random() < 0.1:
            # Cut the sequence inside a frame.
            at = r.randrange(len(frames))
            frames[at] = frames[at][: r.randrange(1, max(2, len(frames[at])))]
            frames = frames[: at + 1]
            case.mutations.append(f"truncated inside frame {at}")
            case.complete = False
        if specs and specs[-1].opcode != 0x8 and case.complete:
            frames.append(build_frame(0x8, struct.pack("!H", 1000), mask=b"\x01\x02\x03\x04"))
        case.frames = frames
        cases.append(case)
    return cases
