"""Strict readers of what crosses the wire, for the fuzzer's verdicts (pure).

The proxy parses with llhttp; these readers do not share it, so a disagreement between
the two shows. ``read_request`` reads one HTTP/1.1 request as RFC 9112 has a sender
write it (what a backend may rely on from a proxy): CRLF line ends, a token method, a
target of visible ASCII, ``HTTP/1.1``, header names that are tokens with the colon
straight after, values without control bytes, no folded lines, one Host, and one
unambiguous framing (one Content-Length of digits, or ``Transfer-Encoding: chunked``
alone). ``read_responses`` reads what a client received as a run of whole responses,
each framed as its headers say, allowing for answers to HEAD. ``read_frame`` reads one
WebSocket frame and ``FrameChecker`` the rules RFC 6455 sets across frames (masking by
direction, reserved bits, opcodes, control frames, fragmentation, UTF-8, close codes).

Each reader raises ``NeedMore`` when the bytes stop before the thing is whole, and
``Malformed`` (with the reason) as soon as they cannot be the start of one.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

MAX_HEAD = 128 * 1024

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # control bytes but HTAB
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9]) ([\t \x21-\x7e\x80-\xff]*)")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DIGITS = re.compile(rb"[0-9]{1,18}")


class NeedMore(Exception):
    """The bytes end before the message or frame does."""


class Malformed(Exception):
    """The bytes cannot be the start of a well-formed message or frame."""


Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class Message:
    """A request or response as read: ``start`` is the request or status line."""

    start: bytes
    headers: Headers
    body: bytes
    size: int  # bytes it took on the wire
    status: int = 0
    method: bytes = b""
    target: bytes = b""

    def values(self, name: bytes) -> list[bytes]:
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]

    def value(self, name: bytes) -> bytes | None:
        found = self.values(name)
        return found[0] if found else None

    def tokens(self, name: bytes) -> set[bytes]:
        return {
            token.strip().lower()
            for value in self.values(name)
            for token in value.split(b",")
            if token.strip()
        }


def _lines(data: bytes, pos: int) -> tuple[list[bytes], int]:
    """The lines of a head starting at ``pos``, up to the empty line; and where the head
    ends."""
    end = data.find(b"\r\n\r\n", pos)
    if end == -1:
        if len(data) - pos > MAX_HEAD:
            raise Malformed("a head longer than any proxy should send")
        # A bare LF could end the head for a lenient reader: name it now.
        if b"\n" in data[pos:].replace(b"\r\n", b""):
            raise Malformed("a bare LF in the head")
        raise NeedMore
    head = data[pos:end]
    if b"\n" in head.replace(b"\r\n", b"") or b"\r" in head.replace(b"\r\n", b""):
        raise Malformed("a bare LF or CR in the head")
    return head.split(b"\r\n"), end + 4


def _fields(lines: list[bytes]) -> Headers:
    headers = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise Malformed(f"a folded header line: {line[:60]!r}")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise Malformed(f"a header line without a token name and a colon: {line[:60]!r}")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise Malformed(f"a control byte in header {name!r}: {value[:60]!r}")
        headers.append((name, value))
    return headers


def _chunked(data: bytes, pos: int) -> tuple[bytes, int]:
    """A chunked body from ``pos``: the data and where it ends (after the trailers)."""
    body = []
    while True:
        end = data.find(b"\r\n", pos)
        if end == -1:
            if len(data) - pos > 1024:
                raise Malformed("a chunk size line that does not end")
            raise NeedMore
        line = data[pos:end]
        size_text, _, extension = line.partition(b";")
        if not _HEX.fullmatch(size_text):
            raise Malformed(f"a chunk size that is not hex: {line[:40]!r}")
        if extension and (b"\n" in extension or b"\r" in extension):
            raise Malformed("a line break in a chunk extension")
        size = int(size_text, 16)
        pos = end + 2
        if size == 0:
            break
        if len(data) < pos + size + 2:
            raise NeedMore
        if data[pos + size : pos + size + 2] != b"\r\n":
            raise Malformed("chunk data longer than its size")
        body.append(data[pos : pos + size])
        pos += size + 2
    # Trailers, then the empty line.
    while True:
        end = data.find(b"\r\n", pos)
        if end == -1:
            raise NeedMore
        line = data[pos:end]
        pos = end + 2
        if not line:
            return b"".join(body), pos
        _fields([line])


def _length(message_headers: Headers) -> int | None:
    lengths = [value for name, value in message_headers if name.lower() == b"content-length"]
    if not lengths:
        return None
    if len(lengths) > 1:
        raise Malformed(f"Content-Length {len(lengths)} times: {lengths!r}")
    if not _DIGITS.fullmatch(lengths[0]):
        raise Malformed(f"a Content-Length that is not digits: {lengths[0]!r}")
    return int(lengths[0])


def _framing(headers: Headers) -> tuple[bool, int | None]:
    """Whether the body is chunked, else its Content-Length (None: none given)."""
    codings = [value for name, value in headers if name.lower() == b"transfer-encoding"]
    length = _length(headers)
    if codings:
        if length is not None:
            raise Malformed("Content-Length and Transfer-Encoding together")
        if len(codings) > 1 or codings[0].lower() != b"chunked":
            raise Malformed(f"a Transfer-Encoding other than chunked alone: {codings!r}")
        return True, None
    return False, length


def read_request(data: bytes, pos: int = 0) -> Message:
    """One request from ``pos``, strictly as a proxy must send it to a backend."""
    lines, pos_body = _lines(data, pos)
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise Malformed(f"a request line that is not three parts: {lines[0][:80]!r}")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise Malformed(f"a method that is not a token: {method[:40]!r}")
    if not _TARGET.fullmatch(target):
        raise Malformed(f"a target with bytes outside visible ASCII: {target[:80]!r}")
    if version != b"HTTP/1.1":
        raise Malformed(f"a request version other than HTTP/1.1: {version[:20]!r}")
    headers = _fields(lines[1:])
    hosts = [value for name, value in headers if name.lower() == b"host"]
    if len(hosts) != 1:
        raise Malformed(f"{len(hosts)} Host headers")
    chunked, length = _framing(headers)
    if chunked:
        body, end = _chunked(data, pos_body)
    else:
        size = length or 0
        if len(data) < pos_body + size:
            raise NeedMore
        body, end = data[pos_body : pos_body + size], pos_body + size
    return Message(lines[0], headers, body, end - pos, method=method, target=target)


# --- responses ---------------------------------------------------------------------


@dataclass
class ResponseRun:
    """What a client received, read as responses: ``rest`` is what follows the last
    whole one (empty when every byte belongs to one), ``problem`` why it is not one,
    ``upgraded`` whether a 101 switched the connection to another protocol (``rest``
    is then that protocol's bytes)."""

    responses: list[Message] = field(default_factory=list)
    rest: bytes = b""
    problem: str = ""
    upgraded: bool = False
    to_close: bool = False  # the last response ran to the end of the connection


def _response(data: bytes, pos: int, head: bool, at_eof: bool) -> tuple[Message, bool]:
    """One response from ``pos``; ``head``: read it as the answer to HEAD (no body).
    Returns it and whether its body ran to the end of the connection."""
    lines, pos_body = _lines(data, pos)
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None:
        raise Malformed(f"not a status line: {lines[0][:80]!r}")
    status = int(match.group(1))
    headers = _fields(lines[1:])
    chunked, length = _framing(headers)
    no_body = head or status < 200 or status in (204, 304)
    if status in (204, 304) or status < 200:
        if chunked:
            raise Malformed(f"Transfer-Encoding on a {status}")
        if status < 200 and length is not None:
            raise Malformed(f"Content-Length on a {status}")
    if no_body:
        body, end, to_close = b"", pos_body, False
    elif chunked:
        body, end = _chunked(data, pos_body)
        to_close = False
    elif length is not None:
        if len(data) < pos_body + length:
            raise NeedMore
        body, end, to_close = data[pos_body : pos_body + length], pos_body + length, False
    else:
        if not at_eof:
            raise NeedMore
        body, end, to_close = data[pos_body:], len(data), True
    message = Message(lines[0], headers, body, end - pos, status=status)
    return message, to_close


def read_responses(data: bytes, *, heads_possible: bool, at_eof: bool) -> ResponseRun:
    """``data`` as a run of whole responses, as far as it goes. A response without a
    body may answer a HEAD: with ``heads_possible`` both readings are tried, and the
    one that reads furthest is kept."""
    best = ResponseRun(rest=data, problem="")
    # Depth-first over the two readings of each response; positions already tried are
    # not tried again (each reading from one position leads to the same futures).
    tried: set[int] = set()
    stack: list[tuple[int, list[Message]]] = [(0, [])]
    while stack:
        pos, responses = stack.pop()
        if pos in tried:
            continue
        tried.add(pos)
        if pos == len(data):
            return ResponseRun(responses, b"")
        problem = ""
        readings = (False, True) if heads_possible else (False,)
        for head in reversed(readings):  # the reading with a body is tried first
            try:
                message, to_close = _response(data, pos, head, at_eof)
            except NeedMore:
                problem = problem or "the bytes end inside a response"
                continue
            except Malformed as exc:
                problem = str(exc)
                continue
            done = [*responses, message]
            if message.status == 101:
                return ResponseRun(done, data[pos + message.size :], upgraded=True)
            if to_close:
                return ResponseRun(done, b"", to_close=True)
            stack.append((pos + message.size, done))
        if pos >= len(data) - len(best.rest):
            best = ResponseRun(responses, data[pos:], problem)
    return best


# --- WebSocket frames ----------------------------------------------------------------

CONTROL = frozenset({0x8, 0x9, 0xA})
DATA = frozenset({0x0, 0x1, 0x2})
# Close codes an endpoint may send (RFC 6455 section 7.4, and the registered 1012-1014).
_SENDABLE_CLOSE = frozenset(range(1000, 1004)) | frozenset(range(1007, 1015))


def close_code_valid(code: int) -> bool:
    return code in _SENDABLE_CLOSE or 3000 <= code <= 4999


@dataclass(frozen=True)
class Frame:
    fin: bool
    rsv: int
    opcode: int
    masked: bool
    payload: bytes  # unmasked
    size: int  # bytes it took on the wire


def read_frame(data: bytes, pos: int = 0, *, max_payload: int = 1 << 24) -> Frame:
    """One frame from ``pos`` (its payload unmasked). Refuses a declared length above
    ``max_payload`` rather than waiting for it."""
    if len(data) < pos + 2:
        raise NeedMore
    first, second = data[pos], data[pos + 1]
    masked = bool(second & 0x80)
    length = second & 0x7F
    at = pos + 2
    if length == 126:
        if len(data) < at + 2:
            raise NeedMore
        (length,) = struct.unpack_from("!H", data, at)
        at += 2
        if length < 126:
            raise Malformed("a 16-bit length that fits 7 bits")
    elif length == 127:
        if len(data) < at + 8:
            raise NeedMore
        (length,) = struct.unpack_from("!Q", data, at)
        at += 8
        if length >> 63:
            raise Malformed("a 64-bit length with the top bit set")
        if length < 65536:
            raise Malformed("a 64-bit length that fits 16 bits")
    if length > max_payload:
        raise Malformed(f"a frame of {length} bytes")
    mask = b""
    if masked:
        if len(data) < at + 4:
            raise NeedMore
        mask = data[at : at + 4]
        at += 4
    if len(data) < at + length:
        raise NeedMore
    payload = data[at : at + length]
    if masked:
        payload = apply_mask(payload, mask)
    return Frame(
        bool(first & 0x80), (first >> 4) & 7, first & 0x0F, masked, payload, at + length - pos
    )


def apply_mask(payload: bytes, mask: bytes) -> bytes:
    if not payload:
        return payload
    repeated = (mask * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        len(payload), "big"
    )


def build_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = None,
    declared: int | None = None,
) -> bytes:
    """A frame's bytes; ``mask`` masks it (a client's), ``declared`` states another
    length than the payload's (a lie)."""
    length = len(payload) if declared is None else declared
    head = bytearray([(0x80 if fin else 0) | (rsv & 7) << 4 | opcode & 0x0F])
    bit = 0x80 if mask is not None else 0
    if length < 126:
        head.append(bit | length)
    elif length < 65536:
        head.append(bit | 126)
        head += struct.pack("!H", length)
    else:
        head.append(bit | 127)
        head += struct.pack("!Q", length)
    if mask is not None:
        return bytes(head) + mask + apply_mask(payload, mask)
    return bytes(head) + payload


@dataclass(frozen=True)
class WsMessage:
    opcode: int
    payload: bytes


class FrameChecker:
    """The rules RFC 6455 sets across the frames one side sends: ``check`` takes each
    frame in turn and raises Malformed at the first broken rule; it returns the data
    message the frame completes, if any. ``masked`` is what the direction requires
    (True from a client); ``max_message`` bounds a message's size."""

    def __init__(self, *, masked: bool, max_message: int) -> None:
        self.masked = masked
        self.max_message = max_message
        self.fragments: list[bytes] = []
        self.fragment_opcode = 0
        self.closed: Frame | None = None

    def check(self, frame: Frame) -> WsMessage | Frame | None:
        if self.closed is not None:
            raise Malformed("a frame after the close frame")
        if frame.masked != self.masked:
            raise Malformed("an unmasked client frame" if self.masked else "a masked server frame")
        if frame.rsv:
            raise Malformed(f"reserved bits {frame.rsv:#x} set without an extension")
        if frame.opcode not in CONTROL and frame.opcode not in DATA:
            raise Malformed(f"opcode {frame.opcode:#x}")
        if frame.opcode in CONTROL:
            if not frame.fin:
                raise Malformed("a fragmented control frame")
            if len(frame.payload) > 125:
                raise Malformed(f"a control frame of {len(frame.payload)} bytes")
            if frame.opcode == 0x8:
                check_close_payload(frame.payload)
                self.closed = frame
            return frame
        if frame.opcode == 0x0:
            if not self.fragments and self.fragment_opcode == 0:
                raise Malformed("a continuation frame with no message begun")
        elif self.fragment_opcode:
            raise Malformed("a new data frame inside a fragmented message")
        else:
            self.fragment_opcode = frame.opcode
        self.fragments.append(frame.payload)
        if sum(len(part) for part in self.fragments) > self.max_message:
            raise Malformed("a message over the size limit")
        if not frame.fin:
            return None
        payload = b"".join(self.fragments)
        opcode = self.fragment_opcode
        self.fragments, self.fragment_opcode = [], 0
        if opcode == 0x1:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise Malformed("a text message that is not UTF-8") from exc
        return WsMessage(opcode, payload)


def check_close_payload(payload: bytes) -> None:
    if not payload:
        return
    if len(payload) == 1:
        raise Malformed("a close payload of 1 byte")
    code = struct.unpack_from("!H", payload)[0]
    if not close_code_valid(code):
        raise Malformed(f"close code {code}")
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Malformed("a close reason that is not UTF-8") from exc
