"""`reconciler run | once | validate | status | schema` (SPEC "Command line").

Every error a user can cause is one line naming the file and field or the flag, never a traceback;
a bad flag stops the agent at start with exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from typing import Any, Sequence

from reconciler import __version__


def _parser() -> argparse.ArgumentParser:
    from reconciler import config as config_module

    parser = argparse.ArgumentParser(prog="reconciler", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"reconciler {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, help_text in (("run", "the daemon: watch, reconcile, publish status, until SIGTERM/SIGINT"),
                            ("once", "one full reconcile pass, then exit; containers keep running")):
        p = sub.add_parser(name, help=help_text)
        config_module.add_flags(p)
        p.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])

    p = sub.add_parser("validate", help="parse and validate manifests without touching the host")
    p.add_argument("paths", nargs="+", metavar="PATH")

    p = sub.add_parser("status", help="print the status of every container")
    p.add_argument("--status_dir", default=None)
    p.add_argument("--work_dir", default=None)
    p.add_argument("--json", action="store_true", help="print the raw status documents")

    p = sub.add_parser("schema", help="print the JSON Schema of the manifest")
    p.add_argument("--status", action="store_true", help="the status document's schema instead")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"run": _run, "once": _once, "validate": _validate, "status": _status, "schema": _schema}[args.command](args)
    except BrokenPipeError:
        return 0


def _agent(args: argparse.Namespace):  # noqa: ANN202
    from pydantic import ValidationError

    from reconciler import config as config_module
    from reconciler.agent import Agent
    from reconciler.isolators.base import IsolatorSetupError

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_module.load(args)
        return Agent(config)
    except (config_module.ConfigError, IsolatorSetupError) as exc:
        print(f"reconciler: {exc}", file=sys.stderr)
        return None
    except ValidationError as exc:  # --default_container_info that is JSON but not a ContainerInfo
        from reconciler.models import ContainerInfo
        from reconciler.source import validation_messages
        problems = "; ".join(validation_messages(exc, ContainerInfo))
        print(f"reconciler: flag --default_container_info: {problems}", file=sys.stderr)
        return None


def _run(args: argparse.Namespace) -> int:
    async def main() -> int:
        agent = _agent(args)
        if agent is None:
            return 2
        await agent.run()
        return 0
    return asyncio.run(main())


def _once(args: argparse.Namespace) -> int:
    async def main() -> int:
        agent = _agent(args)
        if agent is None:
            return 2
        return 0 if await agent.once() else 1
    return asyncio.run(main())


def _validate(args: argparse.Namespace) -> int:
    from reconciler.source import validate_paths

    problems = validate_paths(args.paths)
    for problem in problems:
        print(problem.message)
    if problems:
        print(f"{len(problems)} error(s)", file=sys.stderr)
        return 1
    return 0


def _status(args: argparse.Namespace) -> int:
    import os

    from reconciler.config import AgentConfig
    from reconciler.status import StatusWriter

    directory = args.status_dir or os.path.join(args.work_dir or AgentConfig.model_fields["work_dir"].default, "status")
    writer = StatusWriter(directory)
    docs = writer.read_all()
    if args.json:
        print(json.dumps({"agent": writer.read_agent(), "containers": docs}, indent=2))
        return 0
    print(format_table(docs, time.time()))
    return 0


def format_table(docs: list[dict[str, Any]], now: float) -> str:
    headers = ["NAME", "PHASE", "PID", "RESTARTS", "NET_CLS", "DISK", "AGE", "MESSAGE"]
    rows = [headers]
    for doc in docs:
        net_cls = (doc.get("net_cls") or {}).get("classid") or "-"
        disk = doc.get("disk") or {}
        disk_text = "-"
        if disk:
            used, limit = disk.get("used_bytes"), disk.get("limit_bytes")
            disk_text = f"{_bytes(used)}/{_bytes(limit) if limit is not None else '-'}"
        rows.append([
            doc.get("name", "?"), doc.get("phase", "?"), str(doc.get("pid") or "-"), str(doc.get("restarts", 0)),
            net_cls, disk_text, _age(doc.get("started_at"), now), (doc.get("message") or "")[:80],
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows)


def _bytes(value: int | None) -> str:
    if value is None:
        return "?"
    for unit in ("B", "Ki", "Mi", "Gi", "Ti"):
        if abs(value) < 1024 or unit == "Ti":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return str(value)


def _age(started_at: str | None, now: float) -> str:
    if not started_at:
        return "-"
    import datetime as dt
    try:
        started = dt.datetime.strptime(started_at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc).timestamp()
    except ValueError:
        return "-"
    seconds = max(0, int(now - started))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _schema(args: argparse.Namespace) -> int:
    from reconciler import schema

    print(json.dumps(schema.status_schema() if args.status else schema.manifest_schema(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
