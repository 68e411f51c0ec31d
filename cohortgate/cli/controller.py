"""`cohortgate controller`: the rollback/promotion controller as a service.

    cohortgate controller --policy P [--redis URL] [--als uds:PATH|tcp:HOST:PORT] [--interval 1s]
                          [--listen 127.0.0.1:9480] [--token-file F] [--state-file F] [--name N]
                          [--dashboard 127.0.0.1:9481|off] [--allow-actions]

Without ``--redis`` everything is in this process (embedded): the access-log receiver feeds an
in-process queue, states live in memory and in ``--state-file`` (so a restart keeps them). With
``--redis``, events come from the Redis stream through a consumer group, one controller leads at a
time (a lock with expiry), and states go to the Redis hash every gateway watches.

The live dashboard (``cohortgate.dashboard``) is served on ``--dashboard`` (loopback; ``off`` disables
it); it is read-only unless ``--allow-actions``, and even then every action needs the admin token.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path
from typing import Any

from cohortgate.core.contract import REDIS_ENV, TOKEN_FILE_ENV
from cohortgate.support.cliargs import add_tracing_options
from cohortgate.support.durations import duration_arg, interval_arg
from cohortgate.support.files import changes
from cohortgate.support.runtime import tune_collector

DESCRIPTION = (
    "Watch every variant against control and roll a bad one back (or promote a good one) on its own. "
    "Without --redis everything is in this process: Envoy's access log feeds it directly and states "
    "live in memory and in --state-file. With --redis, events come from the Redis stream, one controller "
    "leads at a time, and states go to the Redis hash every gateway follows. The live dashboard is served "
    "on --dashboard (loopback), read-only unless --allow-actions."
)
DEFAULT_TOKEN_FILE = ".cohortgate/admin.token"
DEFAULT_STATE_FILE = ".cohortgate/state.json"


def _listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--listen wants HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _dashboard(text: str) -> tuple[str, int] | None:
    if text.strip().lower() == "off":
        return None
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--dashboard wants HOST:PORT or off, got {text!r}")
    return host.strip("[]"), int(port)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "controller",
        help="run the rollback/promotion controller",
        description=DESCRIPTION,
    )
    p.add_argument("--policy", required=True, help="the policy file")
    p.add_argument(
        "--redis",
        metavar="URL",
        default=os.environ.get(REDIS_ENV),
        help="Redis URL for the event stream, the shared state and the leader lock "
        "(default: $COHORTGATE_REDIS; none = embedded, in-process)",
    )
    p.add_argument(
        "--als",
        metavar="uds:PATH|tcp:HOST:PORT",
        help="also serve Envoy's gRPC access-log service here (loopback or a Unix socket)",
    )
    p.add_argument("--interval", type=duration_arg, default=1.0, help="evaluation interval (default 1s)")
    p.add_argument("--window", type=duration_arg, default=60.0, help="sliding window for guardrails (default 60s)")
    p.add_argument(
        "--listen", type=_listen, default=("127.0.0.1", 9480), help="JSON API address (default 127.0.0.1:9480)"
    )
    p.add_argument(
        "--token-file",
        default=os.environ.get(TOKEN_FILE_ENV, DEFAULT_TOKEN_FILE),
        help=f"admin bearer token file, created 0600 if missing (default {DEFAULT_TOKEN_FILE})",
    )
    p.add_argument(
        "--state-file",
        default=DEFAULT_STATE_FILE,
        help=f"local copy of the states, kept across restarts (default {DEFAULT_STATE_FILE})",
    )
    p.add_argument("--name", default=None, help="this controller's name in audits (default: host-pid)")
    p.add_argument(
        "--dashboard",
        type=_dashboard,
        default=("127.0.0.1", 9481),
        metavar="HOST:PORT|off",
        help="serve the live dashboard here, loopback only (default 127.0.0.1:9481; off disables it)",
    )
    p.add_argument(
        "--allow-actions",
        action="store_true",
        help="show rollback/promote/resume buttons on the dashboard (each still needs the admin token)",
    )
    p.add_argument(
        "--watch-interval",
        type=interval_arg,
        default=1.0,
        help="check the policy file for edits this often (default 1s; 0: SIGHUP only)",
    )
    p.add_argument(
        "--outcomes-journal",
        default="state/outcomes.jsonl",
        metavar="PATH",
        help="without --redis: the outcome journal (JSON lines) replayed on start and tailed, where 'cohortgate "
        "outcomes import' appends (default state/outcomes.jsonl; with --redis the stream {cohortgate}:outcomes)",
    )
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    p.add_argument(
        "--log-format",
        default="text",
        choices=("text", "ecs"),
        help="text (default) or ecs (Elastic Common Schema JSON)",
    )
    add_tracing_options(
        p,
        "OTLP/HTTP collector: each rollback, promotion, halt or resume is a span with its evidence (needs the otel "
        "extra; off by default)",
    )
    p.set_defaults(func=_run)


class PolicyFollower:
    """Re-read the policy when the file changes or on SIGHUP; a bad file keeps the current one."""

    def __init__(self, controller: Any, path: Path) -> None:
        self.controller = controller
        self.path = path
        self._lock: Any = None

    def trigger(self) -> None:
        import asyncio

        asyncio.get_running_loop().create_task(self.reload("SIGHUP"))

    async def watch(self, interval_s: float) -> None:
        async for _ in changes(self.path, interval_s):
            await self.reload("file changed")

    async def reload(self, trigger: str) -> bool:
        import asyncio
        import logging

        from cohortgate.core.errors import PolicyError, failure_line
        from cohortgate.core.policy import load_policy

        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            try:
                policy = await asyncio.to_thread(load_policy, self.path)
            except PolicyError as exc:  # the gateway's one-line shape, so one log query finds both
                line = failure_line(self.path, exc, self.controller.policy.digest, trigger)
                logging.getLogger("cohortgate.controller").error(line)
                return False
            if policy.digest == self.controller.policy.digest:
                return False
            await self.controller.set_policy(policy)
            return True


def _run(args: argparse.Namespace) -> int:
    import asyncio

    from cohortgate.core.errors import PolicyError
    from cohortgate.core.policy import load_policy
    from cohortgate.support.logs import configure

    configure("controller", args.log_level, args.log_format)
    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 2
    host = args.listen[0]
    if host not in ("127.0.0.1", "::1", "localhost"):
        print("cohortgate controller: --listen must be a loopback address (the API is plaintext)", file=sys.stderr)
        return 2
    if args.dashboard is not None and args.dashboard[0] not in ("127.0.0.1", "::1", "localhost"):
        print("cohortgate controller: --dashboard must be a loopback address (reads need no token)", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(args, policy))
    except (OSError, ValueError) as exc:
        print(f"cohortgate controller: {exc}", file=sys.stderr)
        return 1


class ListenError(OSError):
    """A port this controller was told to serve on is not available; the message says what to pass."""


async def _bind(runner: Any, address: tuple[str, int], what: str, flag: str) -> None:
    from aiohttp import web

    host, port = address
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            reason = "the port is taken (another controller or stack?)"
        raise ListenError(f"{what} cannot listen on {host}:{port}: {reason}; pass {flag}") from None


async def serve(args: argparse.Namespace, policy: Any) -> int:
    import asyncio
    import logging
    import signal
    import socket

    from aiohttp import web

    from cohortgate.controller.als import route_by_path, routes_with_metrics, serve_als
    from cohortgate.controller.api import load_or_create_token, make_app
    from cohortgate.controller.archive import archive_dir
    from cohortgate.controller.gating import OutcomeGate
    from cohortgate.controller.leader import RedisLeader, SoloLeader
    from cohortgate.controller.loop import Controller, ControllerConfig
    from cohortgate.controller.metrics import ControllerMetrics, TrafficMetrics
    from cohortgate.controller.outcomes_api import SERVICE_KEY
    from cohortgate.store.events import InProcessSink, RedisStreamSink, RedisStreamSource
    from cohortgate.store.redis import redact_url, redis_client
    from cohortgate.store.state import InProcessState, RedisState

    log = logging.getLogger("cohortgate.controller")
    name = args.name or f"{socket.gethostname()}-{os.getpid()}"
    metrics = ControllerMetrics()
    gw_metrics = TrafficMetrics(registry=metrics.registry)  # the ALS receiver's request metrics
    config = ControllerConfig(interval_s=args.interval, window_s=args.window)
    if args.redis:
        store = RedisState(args.redis, cache_path=args.state_file)
        sink = RedisStreamSink(args.redis, metrics=gw_metrics)
        reader = redis_client(args.redis, timeout_s=args.interval + 2.0)  # XREADGROUP blocks up to one interval
        source = RedisStreamSource(reader, consumer=name)
        lock_client = redis_client(args.redis)
        leader = RedisLeader(lock_client, ttl_ms=int(max(3.0, 5 * args.interval) * 1000))
    else:
        store = InProcessState(cache_path=args.state_file)
        sink = InProcessSink(metrics=gw_metrics)
        source = sink
        leader = SoloLeader()
        reader = lock_client = None
    await sink.start()
    recorder = None
    if args.dashboard is not None:
        from cohortgate.dashboard.app import TappedSource
        from cohortgate.dashboard.view import Recorder

        recorder = Recorder()
        source = TappedSource(source, recorder.observe)
    tracing = None
    if args.otlp_endpoint:
        from cohortgate.support.tracing import Tracing

        tracing = Tracing("controller", args.otlp_endpoint)
    controller = Controller(
        policy,
        store,
        source,
        leader=leader,
        config=config,
        metrics=metrics,
        name=name,
        tracing=tracing,
        outcomes=OutcomeGate.from_env(policy, journal_path=args.outcomes_journal),
    )
    token = load_or_create_token(args.token_file)
    api_app = make_app(controller, token, sink)
    outcomes = api_app[SERVICE_KEY]
    outcomes.archive_dir = archive_dir(args.state_file)  # finished experiments: `cohortgate report --archived`
    runner = web.AppRunner(api_app, access_log=None)
    dash_runner = als_server = watch = None
    try:
        await runner.setup()
        await _bind(runner, args.listen, "the controller API", "--listen HOST:PORT")
        if recorder is not None:
            from cohortgate.dashboard.app import Dashboard

            dashboard = Dashboard(controller, recorder, token, allow_actions=args.allow_actions, outcomes=outcomes)
            dash_runner = web.AppRunner(dashboard.make_app(), access_log=None, shutdown_timeout=1.0)
            await dash_runner.setup()
            # A controller without the page it was asked for is a broken set-up, not a detail: stop here.
            await _bind(dash_runner, args.dashboard, "the dashboard", "--dashboard HOST:PORT, or --dashboard off")
            log.info(
                "dashboard on http://%s:%d/ (%s)",
                args.dashboard[0],
                args.dashboard[1],
                "actions allowed with the admin token" if args.allow_actions else "read-only",
            )
        if args.als:
            als_server, _ = await serve_als(
                sink,
                args.als,
                gw_metrics,
                on_denied=recorder.observe_denial if recorder is not None else None,
                route_of=route_by_path(lambda: controller.policy),  # denials are counted by route, never by header
                measured=routes_with_metrics(lambda: controller.policy),  # exposures: outcome denominators
            )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        follower = PolicyFollower(controller, Path(args.policy))
        loop.add_signal_handler(signal.SIGHUP, follower.trigger)
        watch = asyncio.create_task(follower.watch(args.watch_interval), name="controller-policy-watch")
        log.info(
            "controller %s: policy %s (%s), %s, API http://%s:%d, token in %s%s",
            name,
            args.policy,
            policy.digest[:12],
            f"Redis {redact_url(args.redis)}" if args.redis else "embedded",
            args.listen[0],
            args.listen[1],
            args.token_file,
            f", access log on {args.als}" if args.als else "",
        )
        tune_collector()  # start-up is done: see cohortgate.support.runtime
        await controller.run(stop)
    finally:
        if watch is not None:
            watch.cancel()
        if als_server is not None:
            await als_server.stop(0.5)
        if dash_runner is not None:
            await dash_runner.cleanup()
        await runner.cleanup()
        await sink.close()
        await store.close()
        for client in (reader, lock_client):
            if client is not None:
                await client.aclose()
        if tracing is not None:
            tracing.shutdown()
    return 0
