"""`reconciler run | once | plan | validate | status | logs | images | schema` (SPEC "Command line").

Every error a user can cause is one line naming the file and field or the flag, never a traceback;
a bad flag stops the agent at start with exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from reconciler import __version__

if TYPE_CHECKING:
    from reconciler.agent import Agent


def _parser() -> argparse.ArgumentParser:
    from reconciler import config as config_module

    parser = argparse.ArgumentParser(prog="reconciler", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"reconciler {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # Each command: its parser, and its handler as the `handler` default (main() calls it).
    for name, handler, help_text in (
            ("run", _run, "the daemon: watch, reconcile, publish status, until SIGTERM/SIGINT"),
            ("once", _once, "one full reconcile pass, then exit; containers keep running")):
        p = sub.add_parser(name, help=help_text)
        config_module.add_flags(p)
        p.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"],
                       help="what the agent logs to stderr (default: info)")
        p.set_defaults(handler=handler)

    p = sub.add_parser("plan", help="what a reconcile would do now, without touching anything "
                                    "(exit 0: no changes, 2: changes, 1: error)")
    config_module.add_flags(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(handler=_plan)

    p = sub.add_parser("validate", help="parse and validate manifests without touching the host")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--manifests_strict_modes", nargs="?", const="true", default="true", metavar="BOOL",
                   help="refuse what the agent refuses: directories and files writable by users other than "
                        "root and yours (true)")
    p.set_defaults(handler=_validate)

    p = sub.add_parser("status", help="print the status of every container")
    p.add_argument("--status_dir", default=None)
    p.add_argument("--work_dir", default=None)
    p.add_argument("--json", action="store_true", help="print the raw status documents")
    p.add_argument("--watch", "-w", action="store_true", help="redraw the table until Ctrl-C")
    p.add_argument("--interval", default="1secs", metavar="DURATION", help="--watch: time between redraws (1secs)")
    p.add_argument("--count", type=int, default=None, metavar="N", help="--watch: stop after N tables")
    p.set_defaults(handler=_status)

    p = sub.add_parser("logs", help="print a container's stdout (or stderr) from its sandbox")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep printing new output, across rotations, until the container ends or Ctrl-C")
    p.add_argument("--stderr", action="store_true", help="the container's stderr instead of its stdout")
    p.add_argument("--tail", type=int, default=None, metavar="N", help="only the last N lines")
    p.add_argument("--status_dir", default=None)
    p.add_argument("--work_dir", default=None)
    p.set_defaults(handler=_logs)

    p = sub.add_parser("images", help="the local image store: `images list`, `images pull NAME...`, `images prune`")
    config_module.add_flags(p)
    p.add_argument("action", choices=["list", "pull", "prune"],
                   help="list: the stored images; pull: fetch images into the store now (what a fleet rollout "
                        "runs before switching manifests); prune: remove the layers no container uses")
    p.add_argument("names", nargs="*", metavar="NAME", help="pull: the image references")
    p.add_argument("--json", action="store_true", help="list: print the images as JSON")
    p.set_defaults(handler=_images)

    p = sub.add_parser("schema", help="print the JSON Schema of the manifest")
    p.add_argument("--status", action="store_true", help="the status document's schema instead")
    p.set_defaults(handler=_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        # A usage error exits 2, which `plan` uses for "changes": there it is an error, 1.
        if exc.code == 2 and next((a for a in argv if not a.startswith("-")), None) == "plan":
            return 1
        raise
    try:
        return args.handler(args)
    except BrokenPipeError:
        return 0


def _agent(args: argparse.Namespace) -> Agent | None:
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
        problems = await agent.once()
        for problem in problems:
            print(f"reconciler once: not converged: {problem}", file=sys.stderr)
        return 1 if problems else 0
    return asyncio.run(main())


def _validate(args: argparse.Namespace) -> int:
    from reconciler.config import AgentConfig
    from reconciler.source import validate_paths

    try:
        strict_modes = AgentConfig._bool(args.manifests_strict_modes)   # the agent's own reading of the flag
    except ValueError as exc:
        print(f"reconciler validate: flag --manifests_strict_modes: {exc}", file=sys.stderr)
        return 2
    problems = validate_paths(args.paths, strict_modes=strict_modes)
    for problem in problems:
        print(problem.message)
    if problems:
        print(f"{len(problems)} error(s)", file=sys.stderr)
        return 1
    return 0


def _plan(args: argparse.Namespace) -> int:
    from reconciler import config as config_module
    from reconciler import plan

    try:
        config = config_module.load(args)
        result = plan.make_plan(config)
    except (config_module.ConfigError, plan.PlanError) as exc:
        print(f"reconciler plan: {exc}", file=sys.stderr)
        return plan.EXIT_ERROR
    print(plan.render_json(result) if args.json else plan.format_plan(result))
    return result.exit_code


def _status(args: argparse.Namespace) -> int:
    from reconciler.status import StatusWriter

    writer = StatusWriter(_status_dir(args))
    if args.watch:
        return _watch_status(writer, args)
    docs = writer.read_all()
    if args.json:
        print(json.dumps({"agent": writer.read_agent(), "containers": docs}, indent=2))
        return 0
    print(format_table(docs, time.time()))
    return 0


def _work_dir(args: argparse.Namespace) -> str:
    from reconciler.config import AgentConfig

    return os.path.abspath(args.work_dir or AgentConfig.model_fields["work_dir"].default)


def _status_dir(args: argparse.Namespace) -> str:
    return args.status_dir or os.path.join(_work_dir(args), "status")


def _watch_status(writer: Any, args: argparse.Namespace) -> int:
    """Redraw in place on a terminal; append time-stamped tables otherwise (a log, a pipe)."""
    from reconciler.status import iso
    from reconciler.units import format_duration, parse_duration

    try:
        interval = parse_duration(args.interval)
    except ValueError as exc:
        print(f"reconciler status: flag --interval: {exc}", file=sys.stderr)
        return 2
    if not 0.1 <= interval <= 86400:
        # watch(1)'s floor: a shorter interval redraws in a busy loop; past a day, time.sleep overflows soon after.
        print(f"reconciler status: flag --interval: {args.interval!r} must be between 100ms and 1days", file=sys.stderr)
        return 2
    tty = sys.stdout.isatty()
    shown = 0
    try:
        while args.count is None or shown < args.count:
            now = time.time()
            table = format_table(writer.read_all(), now)
            header = f"Every {format_duration(interval)}: reconciler status ({writer.directory})    {iso(now)}"
            if tty:
                # Home, each line cleared to its end, then everything below: no flicker, no leftovers.
                lines = [header, "", *table.splitlines()]
                sys.stdout.write(("\x1b[H\x1b[2J" if shown == 0 else "\x1b[H")
                                 + "".join(line + "\x1b[K\n" for line in lines) + "\x1b[J")
            else:
                sys.stdout.write(("\n" if shown else "") + f"--- {iso(now)}\n{table}\n")
            sys.stdout.flush()
            shown += 1
            if args.count is None or shown < args.count:
                time.sleep(interval)
    except KeyboardInterrupt:
        if tty:
            sys.stdout.write("\n")
    return 0


def _logs(args: argparse.Namespace) -> int:
    from reconciler import logs

    try:
        found = find_container(args.name, _status_dir(args), _work_dir(args))
        # The container owns its sandbox's content: every name is opened relative to this fd, never
        # through a link, and only regular files are read (a planted link or FIFO is skipped, and said so).
        directory = found.open_sandbox()
    except LogsError as exc:
        print(f"reconciler logs: {exc}", file=sys.stderr)
        return 1
    stream = "stderr" if args.stderr else "stdout"
    out = sys.stdout.buffer
    # The follower notes the newest rotated file before the history is read: a rotation in between is seen.
    follower = logs.Follower(directory, stream, offset=0) if args.follow else None
    history = logs.History(directory, stream)
    reported: set[str] = set()

    def report_skipped() -> None:
        for problem in [*history.skipped, *(follower.skipped if follower else [])]:
            if problem not in reported:
                reported.add(problem)
                print(f"reconciler logs: not read: {problem} (in {found.sandbox})", file=sys.stderr)

    try:
        if args.tail is not None:
            out.write(history.tail(args.tail))
        else:
            for chunk in history.all():
                out.write(chunk)
        out.flush()
        report_skipped()
        if follower is not None:
            follower.offset = history.live_offset
            for chunk in logs.follow(follower, found.running):
                out.write(chunk)
                out.flush()
                report_skipped()
            report_skipped()
            print(f"reconciler logs: container {found.name!r} ({found.container_id}) ended", file=sys.stderr)
    except KeyboardInterrupt:
        return 0
    finally:
        if follower is not None:
            follower.close()
        os.close(directory)
    return 0


# `reconciler logs`: which sandbox a name's container has ------------------------------------------
#
# The command's side, not the agent's: it reads the status file and the checkpoints (both the agent's
# own files) to find the container, then hands its sandbox to reconciler.logs to read.

class LogsError(Exception):
    """One line for the operator, naming the container and where we looked."""


@dataclass(frozen=True)
class FoundContainer:
    name: str
    container_id: str
    sandbox: str
    checkpoint_dir: str
    status_path: str

    def open_sandbox(self) -> int:
        """The sandbox directory's fd (see logs.open_sandbox); LogsError when it is gone or not a directory."""
        from reconciler.logs import open_sandbox

        try:
            return open_sandbox(self.sandbox)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(self.sandbox):
                raise LogsError(f"container {self.name!r} ({self.container_id}): {self.sandbox} is a symbolic "
                                f"link, not the sandbox the agent made; not following it") from None
            raise LogsError(f"container {self.name!r} ({self.container_id}) has no sandbox at {self.sandbox} "
                            f"any more: {exc.strerror}") from None

    def running(self) -> bool:
        """Until it is destroyed: its termination checkpointed, its checkpoint removed, or its init gone."""
        from reconciler.checkpoint import PID, TERMINATION
        from reconciler.fsutil import read_json
        from reconciler.linux import proc

        try:
            os.stat(os.path.dirname(self.checkpoint_dir))
        except PermissionError:
            return self._running_by_status()   # not the agent's user: checkpoints are private (0700)
        except FileNotFoundError:
            return False
        if not os.path.isdir(self.checkpoint_dir) or os.path.exists(os.path.join(self.checkpoint_dir, TERMINATION)):
            return False
        try:
            pid_doc = read_json(os.path.join(self.checkpoint_dir, PID))
        except ValueError:
            return True
        if pid_doc is None:
            return True   # not forked yet
        return proc.ProcessIdentity(pid_doc["pid"], pid_doc["start_time"]).is_alive()

    def _running_by_status(self) -> bool:
        from reconciler.fsutil import read_json
        try:
            status = read_json(self.status_path) or {}
        except (OSError, ValueError):
            return True    # unreadable now: keep following, Ctrl-C ends it
        return status.get("container_id") == self.container_id and status.get("phase") in ("Pending", "Running")


def find_container(name: str, status_dir: str, work_dir: str) -> FoundContainer:
    """The container a name runs as: the one its status file names, else its newest checkpoint."""
    from reconciler.checkpoint import Checkpoints
    from reconciler.fsutil import read_json

    checkpoints = Checkpoints(os.path.join(work_dir, "containers"), os.path.join(work_dir, "sandboxes"))
    status_path = os.path.join(status_dir, f"{name}.json")
    try:
        status = read_json(status_path)
    except ValueError:
        status = None
    container_id = (status or {}).get("container_id")
    if container_id is not None and not _is_container_id(container_id):
        container_id = None    # not one the agent wrote: never a path out of the sandboxes directory
    if not container_id:
        newest = -1.0
        for cid in checkpoints.ids():
            if not _is_container_id(cid):
                continue
            try:
                doc = read_json(os.path.join(checkpoints.dir(cid), "config.json"))
            except (ValueError, PermissionError):
                continue
            if doc and doc.get("name") == name and float(doc.get("created_at") or 0) > newest:
                container_id, newest = cid, float(doc.get("created_at") or 0)
    if not container_id:
        if status is not None:
            raise LogsError(f"container {name!r} has no sandbox: it is {status.get('phase')}"
                            + (f" ({status['message']})" if status.get("message") else ""))
        raise LogsError(f"no container named {name!r}: no status file {status_path} and no checkpoint "
                        f"of that name in {checkpoints.containers_dir} (see `reconciler status`, or give "
                        f"--work_dir/--status_dir)")
    # The path is the agent's: the sandboxes directory and the id (the checkpoint may name another
    # sandboxes directory, from an earlier --work_dir or --sandbox_directory).
    sandbox = checkpoints.sandbox(container_id)
    try:
        config = read_json(os.path.join(checkpoints.dir(container_id), "config.json"))
        recorded = (config or {}).get("sandbox")
        if isinstance(recorded, str) and os.path.isabs(recorded) and os.path.basename(recorded) == container_id:
            sandbox = recorded
    except (ValueError, PermissionError):
        pass
    if not os.path.isdir(sandbox):
        raise LogsError(f"container {name!r} ({container_id}) has no sandbox at {sandbox} any more")
    return FoundContainer(name, container_id, sandbox, checkpoints.dir(container_id), status_path)


_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def _is_container_id(value: object) -> bool:
    return isinstance(value, str) and _CONTAINER_ID.fullmatch(value) is not None and ".." not in value


def format_table(docs: list[dict[str, Any]], now: float) -> str:
    headers = ["NAME", "PHASE", "PID", "IP", "RESTARTS", "NET_CLS", "DISK", "AGE", "MESSAGE"]
    rows = [headers]
    for doc in docs:
        net_cls = (doc.get("net_cls") or {}).get("classid") or "-"
        disk = doc.get("disk") or {}
        disk_text = "-"
        if disk:
            used, limit = disk.get("used_bytes"), disk.get("limit_bytes")
            disk_text = f"{_bytes(used)}/{_bytes(limit) if limit is not None else '-'}"
        rows.append([
            doc.get("name", "?"), doc.get("phase", "?"), str(doc.get("pid") or "-"), _first_ip(doc),
            str(doc.get("restarts", 0)),
            net_cls, disk_text, _age(doc.get("started_at"), now), (doc.get("message") or "")[:80],
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows)


def _first_ip(doc: dict[str, Any]) -> str:
    """network/cni: the container's first address; `-` on the host network (or with none yet)."""
    for network in doc.get("network_infos") or []:
        for address in network.get("ip_addresses") or []:
            return str(address.get("ip_address") or "-")
    return "-"


def _bytes(value: float | None) -> str:
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


def _images(args: argparse.Namespace) -> int:
    """`images list` / `images pull` / `images prune`: the store of --docker_store_dir, as the agent with the
    same flags uses it (`pull` from --docker_registry, a directory or a registry).
    Prune keeps every layer a container of --work_dir uses (its checkpoint's image.json), under the store's
    lock, so it is safe while the agent runs."""
    from reconciler import config as config_module
    from reconciler.images.errors import ImageError
    from reconciler.images.store import ImageStore

    try:
        config = config_module.load(args)
        store = ImageStore.for_agent(config)
        if args.action == "pull":
            if not args.names:
                print("reconciler images pull: name at least one image", file=sys.stderr)
                return 2
            for name in args.names:
                image = store.pull(name, refresh=True)   # a tag is asked for again: what the rollout moved it to
                print(f"{name}\t{image.id}\t{len(image.layers)} layer(s)")
            return 0
        if args.action == "prune":
            removed = store.prune(set(), work_dir=config.work_dir)   # what is in use is read under the lock
            for layer_id in removed:
                print(f"removed layer sha256:{layer_id}")
            print(f"{len(removed)} unused layer(s) removed from {config.docker_store_path}")
            return 0
        images = store.images()
    except (config_module.ConfigError, ImageError, OSError) as exc:
        print(f"reconciler images: {exc}", file=sys.stderr)
        return 1
    from reconciler.images.listing import image_doc, images_table
    print(json.dumps([image_doc(i) for i in images], indent=2) if args.json else images_table(images, time.time()))
    return 0


def _schema(args: argparse.Namespace) -> int:
    from reconciler import schema

    print(json.dumps(schema.status_schema() if args.status else schema.manifest_schema(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
