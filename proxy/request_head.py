"""What a request head must be to be served: its Host, its target, its version (pure).

The listener (``proxy.server``) asks these while it parses a head, and answers 400 or
505 to what they refuse, as RFC 9112 and nginx do: a Host that is missing (HTTP/1.1),
repeated or not an authority (RFC 3986: a reg-name or IPv4 address, or an IP literal in
brackets, and an optional port of digits), a target that is neither a path nor an
absolute http(s) URI (``*`` only for OPTIONS), an HTTP version other than 1.0 and 1.1.
What passes is the only Host text the proxy ever passes on (``X-Forwarded-Host``).
The path a request is routed by has its dot-segments resolved (``routing_path``), as a
backend resolves them: ``/agent/../internal`` is not a request for the ``/agent`` route.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

SERVED_VERSIONS: Final = frozenset({"1.0", "1.1"})
# llhttp's own refusal of a version it does not know (1.2, 3.0...): a 505 too.
LLHTTP_BAD_VERSION: Final = "Invalid HTTP version"

_SUB_DELIMS: Final = "!$&'()*+,;="
# reg-name = *( unreserved / pct-encoded / sub-delims ), here at least one character: an
# "http" URI with an empty host is invalid (RFC 9110 section 4.2.1). An IPv4 address is
# a reg-name as far as the characters go.
_REG_NAME: Final = rf"(?:[A-Za-z0-9\-._~{re.escape(_SUB_DELIMS)}]|%[0-9A-Fa-f]{{2}})+"
# IP-literal = "[" ( IPv6address / IPvFuture ) "]"; the IPv6 address is checked apart.
_IPV6: Final = r"\[(?P<ipv6>[0-9A-Fa-f:.]+)\]"
_IPV_FUTURE: Final = rf"\[[vV][0-9A-Fa-f]+\.[A-Za-z0-9\-._~{re.escape(_SUB_DELIMS)}:]+\]"
_AUTHORITY: Final = re.compile(
    rf"(?:{_REG_NAME}|{_IPV6}|{_IPV_FUTURE})(?::(?P<port>[0-9]*))?", re.ASCII
)


class BadHead(ValueError):
    """A request head the proxy refuses; ``status`` is the answer (400 or 505)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


def valid_authority(authority: str) -> bool:
    """Whether ``authority`` is ``host [":" port]`` as an http(s) URI may carry it: no
    user info, no empty host, a port of at most five digits up to 65535 (or none)."""
    match = _AUTHORITY.fullmatch(authority)
    if match is None:
        return False
    ipv6 = match.group("ipv6")
    if ipv6 is not None:
        try:
            ipaddress.IPv6Address(ipv6)
        except ValueError:
            return False
    port = match.group("port")
    return not port or (len(port) <= 5 and int(port) <= 65535)


def host_of(value: bytes) -> str:
    """A Host header's value as text, if it is a valid authority; BadHead if not.
    (llhttp keeps the whitespace after a value, which is not part of it.)"""
    try:
        text = value.rstrip(b" \t").decode("ascii")
    except UnicodeDecodeError:
        text = ""
    if not valid_authority(text):
        raise BadHead(400, "the Host header is not a valid host[:port]")
    return text


def absolute_target(target: str, method: str) -> tuple[str | None, str]:
    """A request-target that is not a path (origin-form): its authority and the path
    and query to send on (absolute-form, RFC 9112 section 3.2.2: the authority wins
    over Host), or ``(None, "*")`` for OPTIONS (asterisk-form); BadHead otherwise."""
    if target == "*":
        if method == "OPTIONS":
            return None, target
        raise BadHead(400, "the target * is for OPTIONS only")
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise BadHead(400, "the target must be a path or an absolute http(s) URI")
    end = len(rest)
    for mark in "/?":
        at = rest.find(mark)
        if at != -1 and at < end:
            end = at
    authority, tail = rest[:end], rest[end:]
    if not valid_authority(authority):
        raise BadHead(400, "the target's authority is not a valid host[:port]")
    # A query straight after the authority belongs to the path "/".
    return authority, tail if tail.startswith("/") else "/" + tail


def check_version(version: str) -> None:
    """BadHead (505) for an HTTP version the proxy does not speak."""
    if version not in SERVED_VERSIONS:
        raise BadHead(505, f"HTTP/{version} is not served here: HTTP/1.1 and HTTP/1.0 are")


def routing_path(path: str) -> str:
    """A percent-decoded path with its dot-segments removed (RFC 3986 section 5.2.4), the
    path a backend that resolves them serves: the route is chosen by it, or a client
    could reach any path of a route's backends through the route's prefix
    (``/agent/../internal``, ``/agent/%2e%2e/internal``), and have it shadowed."""
    if "/." not in path:
        return path
    output: list[str] = []
    segments = path.split("/")
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "..":
            if len(output) > 1:
                output.pop()
            if last:
                output.append("")
        elif segment == ".":
            if last:
                output.append("")
        else:
            output.append(segment)
    resolved = "/".join(output)
    return resolved if resolved.startswith("/") else "/" + resolved
