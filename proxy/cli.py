"""The ``strangler`` command line (shell): run, check, demo, dispatcher."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from flags.document import FlagsDocumentError
from flags.file import read_flags
from proxy import __version__, build
from proxy.settings import ConfigError, Settings, load_settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    command = args.command
    if command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if command == "check":
        return check(Path(args.config))
    if command == "run":
        settings = _load_or_report(Path(args.config))
        if settings is None:
            return 1
        from proxy.workers import WorkerStartError, supervise

        try:
            return _run(supervise(settings, Path(args.config)))
        except FlagsDocumentError as exc:
            for problem in exc.problems:
                print(f"strangler: flags: {problem}", file=sys.stderr)
            return 1
        except (OSError, WorkerStartError) as exc:
            print(f"strangler: cannot start: {exc}", file=sys.stderr)
            return 1
    if command == "forkserver":
        settings = _load_or_report(Path(args.config))
        if settings is None:
            return 1
        from proxy.workers import run_forkserver

        listen_fds = [int(fd) for fd in args.listen_fds.split(",")]
        return run_forkserver(settings, listen_fds, args.events_fd, args.supervisor_pid)
    if command == "demo":
        from proxy.demo import run_demo

        return _run(run_demo(duration=args.duration, live=not args.no_live))
    if command == "dispatcher":
        from proxy.dispatcher import serve as serve_dispatcher

        _run(serve_dispatcher(args.name, args.host, args.port, time_scale=args.time_scale))
        return 0
    parser.error(f"unknown command {command}")
    return 2


def check(path: Path) -> int:
    """Validate the configuration and its flags file; print every problem, one a line."""
    settings = _load_or_report(path)
    if settings is None:
        return 1
    problems: list[str] = []
    if settings.flags.file is not None:
        try:
            flags = read_flags(settings.flags.file)
        except FlagsDocumentError as exc:
            problems += [f"flags.file: {problem}" for problem in exc.problems]
        else:
            for index, route in enumerate(settings.routes):
                if flags.get(route.flag) is None:
                    # At run time a missing flag is off: the route could never reach
                    # the candidate, which is a mistake worth stopping a deployment for.
                    problems.append(
                        f"routes[{index}].flag: route {route.name!r}: flag {route.flag!r} is"
                        f" not in {settings.flags.file}"
                    )
    for problem in problems:
        print(f"error: {path}: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"ok: {path}: {len(settings.routes)} route(s), flags provider {settings.flags.provider}")
    return 0


def _load_or_report(path: Path) -> Settings | None:
    try:
        return load_settings(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return None


def _run(coro: Coroutine[Any, Any, int | None]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        result = asyncio.run(coro)
    else:
        result = uvloop.run(coro)
    return int(result or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="strangler",
        description=(
            "Feature-flagged strangler-fig migration proxy: routes each user to the legacy "
            "or the candidate backend by an Unleash flag's rollout, for HTTP, streams and "
            "WebSocket."
        ),
    )
    parser.add_argument(
        "--version", action="version", version=f"strangler {__version__} ({build()})"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="serve traffic")
    run.add_argument("--config", required=True, metavar="FILE", help="TOML configuration")
    check_cmd = sub.add_parser("check", help="validate a configuration and its flags file")
    check_cmd.add_argument("--config", required=True, metavar="FILE")
    demo = sub.add_parser("demo", help="a self-contained demonstration, no external service")
    demo.add_argument("--duration", type=float, default=40.0, metavar="SECONDS")
    demo.add_argument("--no-live", action="store_true", help="print lines instead of a live view")
    forkserver = sub.add_parser("forkserver", help=argparse.SUPPRESS)
    forkserver.add_argument("--config", required=True)
    forkserver.add_argument("--listen-fds", required=True)
    forkserver.add_argument("--events-fd", type=int, required=True)
    forkserver.add_argument("--supervisor-pid", type=int, required=True)
    disp = sub.add_parser("dispatcher", help="run a demo tool dispatcher backend")
    disp.add_argument("--name", choices=["legacy", "candidate"], required=True)
    disp.add_argument("--host", default="127.0.0.1")
    disp.add_argument("--port", type=int, required=True)
    disp.add_argument("--time-scale", type=float, default=1.0)
    return parser
