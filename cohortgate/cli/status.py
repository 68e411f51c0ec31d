"""`cohortgate status | rollback | promote | resume`: look at and steer running experiments.

They talk to the controller's JSON API on loopback, found as every client command finds its stack
(`cohortgate.cli._stack`: flags, else `up`'s run.json, else the hand-started defaults), with the
admin token: the controller owns the state machine, so a manual action goes through the same
transition table, compare-and-set write and audit as its own. With ``--redis URL`` they talk to the
state store directly instead (for when no controller is reachable): status then shows the leader's
last published snapshot, and actions need ``--policy`` to know the variants and rollout steps.
"""

from __future__ import annotations

import argparse
import getpass
import json
import socket
import sys
import time
from typing import Any

from cohortgate.cli._stack import NoStack, add_controller_options, add_state_dir, controller_target, state_dir


def _common(p: argparse.ArgumentParser) -> None:
    add_state_dir(p)
    add_controller_options(p)
    p.add_argument("--redis", metavar="URL", default=None, help="talk to the Redis state store instead of the API")
    p.add_argument("--policy", default=None, help="the policy file (with --redis, for actions)")
    p.add_argument("--json", action="store_true", help="print JSON")


def register(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser("status", help="experiments per route and variant: weights, rates, verdicts, SRM")
    _common(s)
    s.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until interrupted",
    )
    s.add_argument("--no-legend", action="store_true", help="leave out the lines that explain the columns")
    s.set_defaults(func=_status)
    for verb, helptext in (
        ("rollback", "send a variant's users back to control now"),
        ("promote", "move a variant to its next rollout step now"),
    ):
        p = subparsers.add_parser(verb, help=helptext)
        _common(p)
        p.add_argument("route", help="the route's name in the policy")
        p.add_argument("variant", help="the variant's name in that route")
        p.set_defaults(func=_action, verb=verb)
    r = subparsers.add_parser("resume", help="resume a halted route, or restart a rolled-back variant")
    _common(r)
    r.add_argument("route", help="the route's name in the policy")
    r.set_defaults(func=_action, verb="resume", variant=None)


# --------------------------------------------------------------------------- transport


class CliError(Exception):
    pass


def _token(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as exc:
        raise CliError(
            f"cannot read the admin token {path}: {exc.strerror} (is the controller running? or pass --token-file)"
        ) from None


def _http(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    from cohortgate.support import http

    try:
        api, token_file = controller_target(args)
    except NoStack as exc:
        raise CliError(str(exc)) from None
    headers = {
        "Authorization": f"Bearer {_token(token_file)}",
        "X-Cohortgate-Actor": f"cli:{getpass.getuser()}@{socket.gethostname()}",
    }
    try:
        reply = http.call(api + path, method, body=body, headers=headers, timeout=10)
    except OSError as exc:
        raise CliError(f"cannot reach the controller at {api}: {getattr(exc, 'reason', exc)}") from None
    if reply.status >= 400:
        try:
            err = reply.json()["error"]
            raise CliError(f"{err['message']} ({reply.status} {err['code']})") from None
        except (ValueError, KeyError, TypeError):
            raise CliError(f"controller answered {reply.status}") from None
    return reply.json()


async def _redis_status(args: argparse.Namespace) -> dict[str, Any]:
    from cohortgate.store.state import RedisState

    store = RedisState(args.redis, timeout_s=2.0)
    store.connect()
    try:
        doc = await store.read_status()
        states = await store.load()
    finally:
        await store.close()
    if doc is None:
        doc = {"controller": {"note": "no controller has published a status in the last 10 s"}, "routes": {}}
    for name, st in states.items():
        route = doc["routes"].setdefault(name, {"variants": {}})
        route.update(status=st.status, version=st.version, updated_at=st.updated_at, updated_by=st.updated_by)
        for v, w in st.weights.items():
            vdoc = route["variants"].setdefault(v, {})
            vdoc["weight"] = w
            vdoc["enabled"] = v not in st.disabled
            if v in st.variants:
                vdoc["phase"] = st.variants[v].phase.value
    return doc


async def _redis_action(args: argparse.Namespace) -> dict[str, Any]:
    from cohortgate.controller.api import action_result
    from cohortgate.controller.loop import Controller
    from cohortgate.core.policy import load_policy
    from cohortgate.core.rollout import Signal
    from cohortgate.store.events import InProcessSink
    from cohortgate.store.state import RedisState

    if not args.policy:
        raise CliError("with --redis, actions need --policy (the variants and rollout steps)")
    policy = load_policy(args.policy)
    store = RedisState(args.redis, timeout_s=2.0)
    controller = Controller(policy, store, InProcessSink(), name="cli")
    await controller.start()
    try:
        actor = f"manual:cli:{getpass.getuser()}@{socket.gethostname()}"
        changes = await controller.manual(Signal(args.verb), args.route, args.variant, actor)
    finally:
        await store.close()
    return action_result(changes, controller.states[args.route])


# --------------------------------------------------------------------------- commands


def _fetch_status(args: argparse.Namespace) -> dict[str, Any]:
    if args.redis:
        import asyncio

        return asyncio.run(_redis_status(args))
    return _http(args, "GET", "/status")


def _supervision(args: argparse.Namespace) -> dict[str, Any] | None:
    """`up`'s run.json when it is the stack this status comes from: its children's restarts."""
    from cohortgate.local.client import StackInfo, StackNotRunning

    if args.redis:
        return None
    try:
        info = StackInfo.load(state_dir(args))
        api, _ = controller_target(args, info)
    except (StackNotRunning, NoStack):
        return None
    return dict(info.raw) if (info.controller_api or "").rstrip("/") == api else None


def _status(args: argparse.Namespace) -> int:
    from cohortgate.local.client import describe_supervision

    try:
        while True:
            doc = _fetch_status(args)
            run = _supervision(args)
            if run is not None and args.json:
                doc["supervisor"] = {n: {k: c.get(k) for k in ("state", "pid", "restarts", "last_exit")}
                                     for n, c in run.get("children", {}).items()}  # fmt: skip
            out = json.dumps(doc, indent=2, sort_keys=True) if args.json else render(doc, legend=not args.no_legend)
            if run is not None and not args.json:
                out = "\n".join([*describe_supervision(run), out])
            if args.watch is not None and sys.stdout.isatty():
                sys.stdout.write("\x1b[H\x1b[2J")
            print(out, flush=True)
            if args.watch is None:
                return 0
            time.sleep(args.watch)
    except CliError as exc:
        print(f"cohortgate status: {exc}", file=sys.stderr)
        return 1


def _action(args: argparse.Namespace) -> int:
    from cohortgate.core.errors import CohortgateError

    try:
        if args.redis:
            import asyncio

            from cohortgate.core.rollout import InvalidTransition

            try:
                result = asyncio.run(_redis_action(args))
            except (InvalidTransition, KeyError, CohortgateError) as exc:
                raise CliError(str(exc).strip("'\"")) from None
        else:
            body: dict[str, Any] = {"route": args.route}
            if args.variant is not None:
                body["variant"] = args.variant
            result = _http(args, "POST", f"/actions/{args.verb}", body)
    except CliError as exc:
        print(f"cohortgate {args.verb}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    if not result["changes"]:
        print(f"{args.route}: nothing changed")
    for c in result["changes"]:
        weights = ", ".join(f"{k} {v}%" for k, v in c["weights"].items())
        print(f"{args.route}/{c['variant']}: {c['action']} ({c['from']} -> {c['to']}); weights now {weights}")
    return 0


# --------------------------------------------------------------------------- rendering


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * float(x):.2f}%"


def _ms(x: Any) -> str:
    return "-" if x is None else f"{float(x):.1f}"


def _p(x: Any) -> str:
    return "-" if x is None else f"{float(x):.2g}"


LEGEND = (
    "weight: the share gateways apply now; x after it: rolled back, its users are on control (0%x)",
    "phase: running, promoting (one rollout step per clean interval), promoted, rolled_back, halted "
    "(sample-ratio mismatch or control over a guardrail: no automatic promotion)",
    "reqs, err, p50 ms, p99 ms: the controller's sliding window (60 s by default)",
    "p(err), p(lat): always-valid p-values of the variant being worse than control (small: evidence "
    "of harm); -: no data yet",
    "verdict: the last interval's signal (clean, breach, srm, control_breach) and its reason",
    "SRM: the sample-ratio check (do the units seen match the weights?)",
)


def render(doc: dict[str, Any], *, legend: bool = False) -> str:
    """A status document as a plain-text table per route; ``legend`` explains the columns and marks."""
    lines = []
    ctl = doc.get("controller", {})
    if ctl:
        who = ctl.get("name", "?")
        role = "leader" if ctl.get("leader") else "follower"
        digest = str(ctl.get("policy_digest", ""))[:12]
        lines.append(
            f"controller {who} ({role}); store {ctl.get('store', '?')}; policy {digest}"
            if "name" in ctl
            else f"controller: {ctl.get('note', '')}"
        )
        if ctl.get("safe_mode"):
            lines.append(f"SAFE MODE: {ctl['safe_mode']}; challengers serve 0 % until cohortgate resume ROUTE VARIANT")
    for name, r in sorted(doc.get("routes", {}).items()):
        srm = r.get("srm") or {}
        if srm.get("checked"):
            srm_text = ("MISMATCH" if srm.get("mismatch") else "ok") + (
                f" (chi2 {srm['chi2']:.1f}, p {_p(srm['p_chi2'])}, units {srm['counts']})"
            )
        else:
            srm_text = f"not checked ({srm.get('reason', 'no data')})"
        lines.append("")
        lines.append(
            f"route {name}: {r.get('status', '?')}  v{r.get('version', '?')} by {r.get('updated_by', '?')}"
            f"  SRM {srm_text}"
        )
        alert = r.get("alert")
        if alert:
            lines.append(f"  ALERT {alert.get('kind', '')}: {alert.get('reason', '')}")
        header = (
            f"  {'variant':<14}{'weight':>7}  {'phase':<12}{'reqs':>8}{'err':>9}{'p50 ms':>9}{'p99 ms':>9}"
            f"{'p(err)':>9}{'p(lat)':>9}  verdict"
        )
        lines.append(header)
        for vname, v in r.get("variants", {}).items():
            w = v.get("window", {})
            weight = f"{v.get('weight', '?')}%" + ("" if v.get("enabled", True) else "x")
            verdict = v.get("verdict") or {}
            verdict_text = f"{verdict.get('signal', '')}: {verdict.get('reason', '')}" if verdict else ""
            lines.append(
                f"  {vname:<14}{weight:>7}  {v.get('phase', '?'):<12}{w.get('requests', 0):>8}"
                f"{_pct(w.get('error_rate')):>9}{_ms(w.get('p50_ms')):>9}{_ms(w.get('p99_ms')):>9}"
                f"{_p(v.get('p_error')):>9}{_p(v.get('p_latency')):>9}  {verdict_text}"
            )
        for sname, s in (r.get("shadows") or {}).items():
            delta = s.get("latency_delta_ms") or {}
            agreement = "-" if s.get("agreement") is None else f"{100 * s['agreement']:.1f}%"
            lines.append(
                f"  shadow {sname}: {s.get('pairs', 0)} pairs, agreement {agreement}, "
                f"latency delta p50 {_ms(delta.get('p50'))} ms (mean {_ms(delta.get('mean'))}), "
                f"shadow errors {s.get('shadow_errors', 0)}"
            )
    if legend:
        lines += ["", *(f"  {line}" for line in LEGEND)]
    return "\n".join(lines).lstrip("\n")
