"""``python -m worker.healthcheck``: do this host's Celery workers answer over the broker?

The worker image's Docker ``HEALTHCHECK``. It prints one line and exits 0 (healthy) or 1.

Which workers are expected: ``simmim-service worker`` starts one Celery process per GPU
(``train-gpu0@<host>``, ``train-gpu1@<host>``, ...) or one per queue set (``embed@<host>``),
and how many depends on the GPUs it finds, so the check does not guess a list. It reads the
process table (``/proc``) of this host (in a container: of this container) and expects every
Celery *worker* process that uses the same broker as this check (``SIMMIM_BROKER_URL``);
workers of another deployment on a shared host are not its business. Each expected node
gets a control ping (``--timeout`` seconds); the host is healthy when at least one worker
runs and every one of them answers.

So it reports a hung worker, one that lost its broker connection, an unreachable broker, and
a supervisor whose workers have all died. A worker that crashed and waits for the
supervisor's restart (backoff) is not running and therefore not expected; the supervisor
handles it. ``--node NAME`` (repeatable) names the expected nodes instead, for use outside
a container.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from celery import Celery
from celery.utils.nodenames import default_nodename, host_format
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url
from pydantic import ValidationError

from simmim_service.settings import Settings
from worker.celery_app import celery_config

PROC = Path("/proc")

# ``celery`` options that take a value and may come before the subcommand.
_GLOBAL_OPTIONS_WITH_VALUE = {"-A", "--app", "-b", "--broker", "--result-backend", "--loader", "--config",
                              "--workdir"}
# With setproctitle installed, Celery rewrites its command line to "[celeryd: node@host:MainProcess] ...".
_PROCTITLE = re.compile(r"^\[celeryd: (?P<node>[^\s:\]]+@[^\s:\]]+):")


def worker_node(argv: Sequence[str]) -> str | None:
    """The node name of a ``celery ... worker`` command line (``%h`` expanded), else None."""
    if argv and (match := _PROCTITLE.match(" ".join(argv))):
        return match["node"]
    rest = _after_celery(argv)
    if rest is None or _subcommand(rest) != "worker":
        return None
    hostname = None
    for i, arg in enumerate(rest):
        if arg in ("-n", "--hostname") and i + 1 < len(rest):
            hostname = rest[i + 1]
        elif arg.startswith("--hostname="):
            hostname = arg.split("=", 1)[1]
        elif arg.startswith("-n") and len(arg) > 2:
            hostname = arg[2:]
    # The same expansion Celery applies to ``-n`` (celery/bin/worker.py).
    return host_format(default_nodename(hostname))


def _after_celery(argv: Sequence[str]) -> list[str] | None:
    """The arguments after ``celery`` in ``python -m celery ...`` or ``[python] .../celery ...``."""
    for i, arg in enumerate(argv[:3]):
        if arg == "-m" and i + 1 < len(argv) and argv[i + 1] == "celery":
            return list(argv[i + 2:])
        if Path(arg).name == "celery":
            return list(argv[i + 1:])
    return None


def _subcommand(args: Sequence[str]) -> str | None:
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in _GLOBAL_OPTIONS_WITH_VALUE:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def local_worker_nodes(broker_url: str, proc: Path = PROC) -> set[str]:
    """Node names of the Celery worker processes on this host whose broker is ``broker_url``.

    Prefork pool children share their parent's command line, so each node counts once.
    Processes that vanish or cannot be read (another user's) are passed over.
    """
    default_broker = Settings.model_fields["broker_url"].default
    nodes = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
            node = worker_node(argv)
            if node is None:
                continue
            env = _environ((entry / "environ").read_bytes())
        except OSError:
            continue
        if env.get("SIMMIM_BROKER_URL", default_broker) == broker_url:
            nodes.add(node)
    return nodes


def _environ(raw: bytes) -> dict[str, str]:
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {key: value for key, _, value in pairs}


def ping(settings: Settings, nodes: Iterable[str], timeout: float) -> set[str]:
    """The nodes among ``nodes`` that answer a control ping within ``timeout`` seconds.

    Raises kombu's ``OperationalError`` (or an ``OSError``) when the broker cannot be reached.
    """
    app = Celery("simmim-healthcheck", set_as_current=False)
    app.conf.update(celery_config(settings))
    connect_timeout = min(timeout, 5.0)
    app.conf.update(broker_connection_timeout=connect_timeout, redis_socket_connect_timeout=connect_timeout)
    try:
        with app.connection_for_write() as conn:
            # Fail in seconds when the broker is down instead of retrying for minutes.
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout)
            replies = app.control.ping(destination=sorted(nodes), timeout=timeout, connection=conn) or []
    finally:
        app.close()
    return {node for reply in replies for node in reply}


def check(settings: Settings, timeout: float, nodes: Iterable[str] | None = None,
          proc: Path = PROC) -> tuple[int, str]:
    """(exit code, the one line to print): 0 when every expected node answered, else 1."""
    broker = maybe_sanitize_url(settings.broker_url)
    expected = set(nodes) if nodes else local_worker_nodes(settings.broker_url, proc)
    if not expected:
        return 1, f"unhealthy: no Celery worker process on this host uses the broker {broker}"
    try:
        answered = ping(settings, expected, timeout)
    except (OperationalError, OSError) as err:
        return 1, f"unhealthy: broker {broker} unreachable ({type(err).__name__}: {_one_line(err)})"
    silent = sorted(expected - answered)
    if silent:
        return 1, (f"unhealthy: {len(silent)} of {len(expected)} Celery worker(s) did not answer a ping "
                   f"within {timeout:g} s: {', '.join(silent)}")
    return 0, f"healthy: {len(expected)} Celery worker(s) answered: {', '.join(sorted(expected))}"


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Print one line; 0 healthy, 1 not (Docker's HEALTHCHECK convention)."""
    parser = argparse.ArgumentParser(prog="python -m worker.healthcheck", description=__doc__.split("\n")[0])
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for answers (default 5)")
    parser.add_argument("--node", action="append", default=None, metavar="NAME@HOST",
                        help="expect this node (repeatable) instead of the Celery workers found in /proc")
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as err:
        code, line = 1, f"unhealthy: invalid SIMMIM_* settings: {_one_line(err)}"
    else:
        code, line = check(settings, args.timeout, args.node)
    print(line, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
