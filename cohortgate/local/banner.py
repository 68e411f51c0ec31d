"""What `cohortgate up` prints once the stack is up, as pure functions of run.json and the plan.

Every command shown is meant to be pasted as is: paths relative to the working directory when they
lie below it, the flags this stack needs (its ports, state dir, token file). No secret is printed:
the curl example mints its own token with `cohortgate token` (a one-hour token on stdout would land
in terminal scrollback and CI logs).
"""

from __future__ import annotations

import contextlib
import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cohortgate.local.client import DEFAULT_CLIENT, DEFAULT_STATE_DIR, demo_body
from cohortgate.local.plan import SidecarSpec
from cohortgate.local.shoppers import OutcomeDemo

DEFAULT_CONTROLLER_PORT = 9480
TOKEN_TTL = "1h"
DEFAULT_ISSUER = "https://auth.cohortgate.local"  # `cohortgate token`'s defaults
DEFAULT_AUDIENCE = "cohortgate"


def rel(path: Path | str, cwd: Path | None = None) -> str:
    """``path`` relative to the working directory when it lies below it (for copy-paste), else absolute."""
    p = Path(path)
    with contextlib.suppress(ValueError):
        return str(p.resolve().relative_to((cwd or Path.cwd()).resolve()))
    return str(p)


def rel_uds(spec: str) -> str:
    return f"uds:{rel(spec[4:])}" if spec.startswith("uds:") else spec


def state_flag(state_dir: Path) -> str:
    """`` --state-dir DIR`` unless it is the default one."""
    return "" if Path(state_dir).resolve() == Path(DEFAULT_STATE_DIR).resolve() else f" --state-dir {rel(state_dir)}"


def status_command(controller_port: int, state_dir: Path) -> str:
    """`cohortgate status --watch` with the flags this stack needs (its port, its token)."""
    command = "cohortgate status --watch"
    if controller_port != DEFAULT_CONTROLLER_PORT:
        command += f" --api http://127.0.0.1:{controller_port}"
    if Path(state_dir).resolve() != Path(DEFAULT_STATE_DIR).resolve():
        command += f" --token-file {rel(Path(state_dir) / 'admin.token')}"
    return command


def token_command(
    certs_dir: Path,
    sub: str,
    *,
    residency: str | None = None,
    scopes: Sequence[str] = ("predict",),
    ttl: str = TOKEN_TTL,
    issuer: str = DEFAULT_ISSUER,
    audience: str = DEFAULT_AUDIENCE,
) -> str:
    """The `cohortgate token` command line that mints a token this stack accepts."""
    words = ["cohortgate", "token", "--certs", rel(certs_dir), "--sub", sub]
    if residency:
        words += ["--residency", residency]
    for scope in scopes:
        words += ["--scope", scope]
    words += ["--ttl", ttl]
    if issuer != DEFAULT_ISSUER:
        words += ["--issuer", issuer]
    if audience != DEFAULT_AUDIENCE:
        words += ["--audience", audience]
    return shlex.join(words)


@dataclass(frozen=True, slots=True)
class BannerFacts:
    """What the banner needs besides run.json."""

    took_s: float
    transport: str
    redis: str | None
    state_dir: Path
    sidecars: Sequence[tuple[SidecarSpec, int]]
    model: str | None  # the model `call`/curl examples use; None: no local model route
    issuer: str = DEFAULT_ISSUER
    audience: str = DEFAULT_AUDIENCE


def banner(run: Mapping[str, Any], facts: BannerFacts) -> list[str]:
    """The lines `up` prints when every child is ready: where each thing is, and what to try."""
    endpoints, children = run["endpoints"], run["children"]

    def pid(name: str | None) -> str:
        child = children.get(name) if name else None
        return f"pid {child['pid']}" if child and child.get("pid") else ""

    rows = [
        ("gateway (Envoy, mTLS + JWT)", endpoints["gateway"], "envoy"),
        ("Envoy admin", endpoints["envoy_admin"], None),
        ("dashboard", endpoints["dashboard"], None),
        ("controller API", endpoints["controller_api"], "controller"),
        ("gateway metrics (Prometheus)", endpoints["gateway_metrics"], None),
        ("gateway processor (ext_proc)", f"{rel_uds(endpoints['processor'])} ({facts.transport})", "gateway"),
        ("access log service (ALS)", rel_uds(endpoints["access_log"]), None),
    ]
    for spec, port in facts.sidecars:
        label = f"{spec.route} {'shadow' if spec.shadow else 'variant'} {spec.variant} ({spec.region})"
        if spec.fault_rate:
            label += f" fault {spec.fault_rate:g}"
        rows.append((label, f"http://127.0.0.1:{port}", spec.name))
    width = max(len(r[0]) for r in rows)
    url_width = max(len(r[1]) for r in rows)
    mode = f"Redis {facts.redis}" if facts.redis else "embedded, no Redis"
    lines = ["", f"cohortgate is up in {facts.took_s:.1f}s ({mode})."]
    lines += [f"  {label:<{width}}  {url:<{url_width}}  {pid(name)}".rstrip() for label, url, name in rows]
    lines.append(
        f"  state: {rel(Path(run['state_dir']) / 'run.json')}   logs: {rel(run['logs'])}/   "
        f"policy: {rel(run['policy']['effective'])}"
    )
    flag = state_flag(facts.state_dir)
    lines += ["", "Try it:"]
    if facts.model:
        lines.append(f"  cohortgate call {facts.model} --sub alice --residency eu{flag}")
        lines.append(f"  cohortgate traffic --duration 60s{flag}")
    lines.append(f"  {status_command(run['ports']['controller'], facts.state_dir)}")
    if facts.model:
        certs = run["certs"]
        client = certs["clients"][DEFAULT_CLIENT]
        mint = token_command(Path(certs["dir"]), "alice", residency="eu", issuer=facts.issuer, audience=facts.audience)
        body = json.dumps(demo_body(), separators=(",", ":"))
        lines += [
            "",
            f"or with curl (the $(...) mints a token valid for {TOKEN_TTL}):",
            f"  curl -i --cert {rel(client['cert'])} --key {rel(client['key'])} --cacert {rel(certs['ca'])} \\",
            f'    -H "Authorization: Bearer $({mint})" \\',
            "    -H 'content-type: application/json' \\",
            f"    -d '{body}' \\",
            f"    {endpoints['gateway']}/v2/models/{facts.model}/infer",
        ]
    lines += ["", "Ctrl-C stops everything."]
    return lines


def demo_lines(
    sidecars: Sequence[SidecarSpec],
    *,
    fault_after_s: float,
    traffic_log: Path,
    dashboard: str | None,
    status: str,
    experiment: tuple[str, OutcomeDemo] | None = None,
    drift: str = "",
) -> list[str]:
    """What `up --demo` prints when its traffic starts: what will fail, from when, where to watch;
    with ``experiment`` (route, its shoppers), the outcome experiment and the decisions to expect;
    with ``drift`` (`cohortgate traffic --drift`), the input drift it plants."""
    lines = ["", f"Demo: `cohortgate traffic` sends 100 req/s from 1000 sticky users (log: {rel(traffic_log)})."]
    if drift:
        lines.append(
            f"  it plants input drift ({drift}): expect a rollback for input drift, "
            "with the drift panel on the dashboard."
        )
    for spec in sidecars:
        if not spec.fault_rate:
            continue
        when = f" from {fault_after_s:g} s after its first request on" if fault_after_s else ""
        lines.append(
            f"  {spec.route}/{spec.variant} fails {spec.fault_rate:.0%} of its requests{when}: expect a rollback."
        )
    if experiment is not None:
        route, demo = experiment
        rates = ", ".join(f"{v} {r:.0%}" for v, r in demo.rates.items())
        control = next(iter(demo.rates.values()))
        better = [v for v, r in list(demo.rates.items())[1:] if r > control]
        worse = [v for v, r in list(demo.rates.items())[1:] if r < control]
        lines.append(
            f"  {route}: {demo.rps:g} visitors/s convert at {rates}; each outcome is posted with its exposure token."
        )
        expect = [f"promote {route}/{v}" for v in better] + [f"rollback {route}/{v}" for v in worse]
        if expect:
            lines.append(f"  expect {' and '.join(expect)} on {demo.metric} within about 3 minutes.")
    lines.append("Watch the controller roll the canary back within a minute:")
    if dashboard:
        lines.append(f"  dashboard:  {dashboard}")
    lines += [
        f"  {status}",
        f"  tail -f {rel(traffic_log)}",
        "Decisions also show here, as `controller: rollback ...` and `controller: promote ...`.",
        "",
    ]
    return lines
