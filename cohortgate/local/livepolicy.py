"""Live policy for `cohortgate up`: follow edits of the source file so that the gateway and the
controller always serve the same policy.

The effective policy (backend URLs on the ports the sidecars bound, absolute paths) goes to two
files with the same bytes, so the same digest: the gateway's, and the controller's. An edit is
written to the gateway's file first; only once the gateway's ``/healthz`` names the new digest is it
written to the controller's. When the gateway refuses it (its reload-failure counter moves, e.g. a
JWKS that does not load) or does not switch in time, the gateway's file is put back to the serving
bytes at once: the controller never runs a policy the gateway refused, and reverting the source
later finds both files already on the serving policy (issue 16.8).

The source is followed on OS file events (`cohortgate.support.files.watch`, in a thread): an edit
marks the stamp stale and wakes `up`'s loop (``edited``), which applies it at once (it had waited up
to 0.1 s for its next turn); its once-a-second look stays as the safety net. Once the gateway's file
is written, `up` sends the gateway SIGHUP, so the edit reaches it without waiting for the gateway's
own file event (which stays, for edits of the file by hand).

New sidecars start (and become ready) before the gateway sees the edit; sidecars the new policy no
longer names stop after the gateway switched and a grace (requests routed to them finish).
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import yaml

from cohortgate.core.errors import PolicyError
from cohortgate.core.policy import Policy, parse_policy, parse_policy_data, route_lines_json
from cohortgate.local import probes
from cohortgate.local.banner import rel
from cohortgate.local.plan import SidecarSpec, StackError, effective_policy_data, url_key
from cohortgate.local.recipes import RELOAD_GRACE_S
from cohortgate.local.supervisor import POLL_S, Child, Interrupted
from cohortgate.support.files import FileStamp, watch, write_atomic

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
SOURCE_SAFETY_NET_S = 5.0  # the event watch also stats the source this often (events lost, odd file systems)
SWITCH_PER_CLUSTER_S = 0.01  # the gateway's own limit is 5 s + 5 ms a cluster of its CDS file, plus its parse
GATEWAY_SWITCH_S = 10.0  # a policy edit: the gateway confirms new clusters with Envoy (5 s at most), then swaps


def effective_text(source_data: Any, source: Path, urls: dict[str, str], outcomes_url: str | None = None) -> str:
    """The effective policy's text: the source's data with URLs and paths rewritten, as JSON (which
    is YAML) under a comment header.

    JSON because the gateway and the controller read it on every edit: a 1 000-route policy is
    written in ~0.01 s (libyaml's dump: ~0.5 s) and read in ~0.04 s (YAML with positions: ~1 s);
    one route a line, so that a reload reads only the routes an edit changed (a few ms)."""
    if not isinstance(source_data, dict):
        raise StackError(f"{rel(source)} is not a mapping")
    effective = effective_policy_data(source_data, source.parent, urls, outcomes_url)
    header = (
        f"# Effective policy written by `cohortgate up` from {source}.\n"
        "# Backend URLs point at the ports the sidecars bound; file paths are absolute.\n"
        "# Edit the source file, not this one: `up` rewrites this file when the source changes.\n"
    )
    # one route a line: the gateway's reload (and up's own) reads only the lines an edit changed
    return header + route_lines_json(effective).decode() + "\n"


class StackOps(Protocol):
    """What live policy needs from the running stack."""

    sidecars: dict[tuple[Any, ...], tuple[SidecarSpec, int]]  # spec.key -> (spec, port)

    def progress(self, message: str) -> None: ...
    def specs(self, policy: Policy) -> tuple[SidecarSpec, ...]: ...
    def ensure_models(self, specs: Sequence[SidecarSpec]) -> None: ...
    def port(self, preferred: int | None, what: str = "") -> int: ...
    def start_sidecars(self, sidecars: Sequence[tuple[SidecarSpec, int]]) -> list[Child]: ...
    def retire(self, children: Sequence[Child], grace_s: float) -> None: ...
    def child_name_taken(self, name: str) -> bool: ...
    def find_child(self, name: str) -> Child | None: ...
    def write_run_file(self) -> None: ...
    def tick(self) -> None: ...
    def sleep(self, seconds: float) -> None: ...


class LivePolicy:
    """The policy serving now, its two files, and the following of the source file."""

    def __init__(
        self,
        source: Path,
        gateway_file: Path,
        controller_file: Path,
        *,
        gateway_health: str,
        gateway_metrics: str,
        switch_timeout_s: float = GATEWAY_SWITCH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.gateway_file = gateway_file
        self.controller_file = controller_file
        self.gateway_health = gateway_health
        self.gateway_metrics = gateway_metrics
        self.controller_api = ""  # an outcomes route's backend: the controller `up` runs (set with the ports)
        self.switch_timeout_s = switch_timeout_s
        self.clock = clock
        self.policy: Policy | None = None  # the effective policy serving now
        self.text = ""  # its bytes, as both files hold them
        self.stamp: FileStamp | None = None  # the source file as last looked at
        self.source_digest = ""
        self._watcher: threading.Thread | None = None
        self._clusters = 0  # clusters of the edit being applied (the gateway's time grows with them)
        self._marks: dict[str, float] = {}
        self._stop_watching = threading.Event()
        self.edited = threading.Event()  # set on an OS event for the source: `up`'s loop wakes at once

    def read_source(self) -> bytes:
        try:
            return self.source.read_bytes()
        except OSError as exc:
            raise StackError(f"cannot read the policy {rel(self.source)}: {exc.strerror or exc}") from None

    def parse_source(self, raw: bytes) -> Policy:
        return parse_policy(raw, filename=str(self.source), base_dir=self.source.parent)

    def install(self, raw: bytes, source_policy: Policy, urls: dict[str, str]) -> Policy:
        """At start-up: write both files with the effective policy of ``raw`` (nothing serves yet)."""
        text = effective_text(yaml.load(raw, Loader=_LOADER), self.source, urls, self.controller_api or None)
        policy = self._parse_effective(text)
        write_atomic(self.gateway_file, text.encode())
        write_atomic(self.controller_file, text.encode())
        self.policy, self.text = policy, text
        self.source_digest = source_policy.digest
        self.stamp = FileStamp.of(self.source)
        return policy

    def _parse_effective(self, text: str) -> Policy:
        return parse_policy(text.encode(), filename=str(self.gateway_file), base_dir=self.gateway_file.parent)

    def _parse_into(self, text: str, out: list[Policy | BaseException]) -> None:
        try:
            out.append(self._parse_effective(text))
        except BaseException as exc:
            out.append(exc)

    def force_look(self) -> None:
        """SIGHUP: read the source at the next look even if its stamp did not change."""
        self.stamp = None

    def watch_source(self) -> None:
        """Mark the source stale the moment the OS reports an edit (a daemon thread, started once)."""
        if self._watcher is not None:
            return

        def run() -> None:
            for _stamp in watch(self.source, SOURCE_SAFETY_NET_S, self._stop_watching):
                self.force_look()
                self.edited.set()

        self._watcher = threading.Thread(target=run, name="cohortgate-policy-source-watch", daemon=True)
        self._watcher.start()
        atexit.register(self.stop_watching)

    def stop_watching(self) -> None:
        self._stop_watching.set()

    # ------------------------------------------------------------------ following

    def follow(self, stack: StackOps) -> None:
        """Re-validate a changed source policy and apply it; a bad edit keeps the running one."""
        self.watch_source()
        stamp = FileStamp.of(self.source)
        if stamp is None or stamp == self.stamp:
            return
        self.stamp = stamp
        self._marks = {"seen": time.monotonic()}  # where an edit's time goes, said when it is applied
        try:
            raw = self.read_source()
        except StackError as exc:
            stack.progress(f"policy: {exc}; keeping the running policy")
            return
        if hashlib.sha256(raw).hexdigest() == self.source_digest:
            return
        try:
            source_policy, data = parse_policy_data(raw, filename=str(self.source), base_dir=self.source.parent)
            specs = stack.specs(source_policy)
            stack.ensure_models(specs)
        except (PolicyError, StackError) as exc:
            stack.progress(f"policy: edit refused, the running policy stays:\n{exc}")
            return
        self.source_digest = source_policy.digest
        self._clusters = len(source_policy.backends)
        self._marks["validated"] = time.monotonic()
        try:
            self._apply(stack, data, specs)
        except Interrupted:
            return  # a signal arrived while new sidecars were starting: the watch loop stops
        except (StackError, PolicyError, OSError) as exc:
            stack.progress(f"policy: could not apply the edit, the running policy stays: {exc}")

    def _apply(self, stack: StackOps, data: Any, specs: Sequence[SidecarSpec]) -> None:
        wanted = {s.key: s for s in specs}
        removed = [stack.sidecars.pop(k) for k in list(stack.sidecars) if k not in wanted]
        added: list[tuple[SidecarSpec, int]] = []
        for key, spec in wanted.items():
            if key in stack.sidecars:
                continue
            if stack.child_name_taken(spec.name):  # the same variant with another model: the old one still runs
                n = 2
                while stack.child_name_taken(f"{spec.name}-{n}"):
                    n += 1
                spec = dataclasses.replace(spec, name=f"{spec.name}-{n}")
            same_url = any(url_key(spec.url) == url_key(o.url) for o, _ in removed)  # still held by the old one
            port = stack.port(None if same_url else spec.port, spec.name)
            stack.sidecars[spec.key] = (spec, port)
            added.append((spec, port))

        new_children: list[Child] = []

        def undo() -> None:
            stack.retire(new_children, 0)
            for spec, _ in added:
                stack.sidecars.pop(spec.key, None)
            stack.sidecars.update((spec.key, (spec, port)) for spec, port in removed)

        try:
            if added:
                new_children = stack.start_sidecars(added)
            urls = {spec.url: f"http://127.0.0.1:{port}" for spec, port in stack.sidecars.values()}
            text = effective_text(data, self.source, urls, self.controller_api or None)
        except (Interrupted, StackError, PolicyError):  # ChildFailed is a StackError
            undo()
            raise
        assert self.policy is not None
        digest = hashlib.sha256(text.encode()).hexdigest()  # what the gateway's Policy.digest will be
        if digest == self.policy.digest:  # e.g. only comments changed
            self._restore_files()
            undo()
            stack.progress(f"policy: {rel(self.source)} changed, the effective policy did not")
            return
        # up's own parse of the effective text (~1 s for 1 000 routes on 2 busy cores) runs while the
        # gateway parses and confirms its clusters, not before it starts.
        parsed: list[Policy | BaseException] = []
        parse = threading.Thread(
            target=self._parse_into, args=(text, parsed), name="cohortgate-effective-parse", daemon=True
        )
        self._marks["written"] = time.monotonic()
        verdict = self._switch_gateway(stack, text, digest, after_write=parse.start)
        self._marks["served"] = time.monotonic()
        parse.join()
        if verdict is None and not isinstance(parsed[0], Policy):
            verdict = f"the effective policy does not parse: {parsed[0]}"  # the gateway took what up cannot read
        if verdict is not None:
            self._restore_files()
            undo()
            stack.write_run_file()
            stack.progress(f"policy: {verdict}; the running policy stays on the gateway and the controller")
            return
        write_atomic(self.controller_file, text.encode())  # the controller follows what the gateway serves
        new = parsed[0]
        assert isinstance(new, Policy)
        self.policy, self.text = new, text
        old = [c for spec, _ in removed if (c := stack.find_child(spec.name)) is not None]
        stack.retire(old, RELOAD_GRACE_S)
        stack.write_run_file()
        changes = f"sidecars: {len(added)} started, {len(removed)} stopped" if added or removed else "same sidecars"
        stack.progress(f"policy: applied the edit of {rel(self.source)} ({changes}; {self._timing()})")

    def _timing(self) -> str:
        m = self._marks
        seen = m["seen"]
        return (
            f"validated in {m['validated'] - seen:.2f} s, the gateway's file written at {m['written'] - seen:.2f} s, "
            f"served at {m['served'] - seen:.2f} s"
        )

    def _restore_files(self) -> None:
        """Both files back on the serving bytes (a no-op when they hold them already)."""
        for path in (self.gateway_file, self.controller_file):
            try:
                same = path.read_text() == self.text
            except OSError:
                same = False
            if not same:
                write_atomic(path, self.text.encode())

    def _switch_gateway(
        self, stack: StackOps, text: str, digest: str, after_write: Callable[[], None] = lambda: None
    ) -> str | None:
        """Write the gateway's file and wait for it to serve ``digest``: None when it does, else why not.

        Both facts come from ``/healthz`` (a few bytes): scraping ``/metrics`` every 50 ms, ~1 000 routes
        of series, took the gateway's CPU while it parsed the edit."""
        failures = probes.gateway_switch_state(self.gateway_health)[1]
        write_atomic(self.gateway_file, text.encode())
        gateway = stack.find_child("gateway")
        if gateway is not None:  # handed over at once: its file event came 0.03-0.15 s later (a busy state dir)
            gateway.hangup()
        after_write()
        serving_n = len(self.policy.backends) if self.policy is not None else 0
        timeout_s = self.switch_timeout_s + SWITCH_PER_CLUSTER_S * (serving_n + self._clusters)
        deadline = self.clock() + timeout_s
        while self.clock() < deadline:
            stack.tick()
            serving, now_failed = probes.gateway_switch_state(self.gateway_health)
            if serving is not None and digest.startswith(serving):
                return None
            if failures is not None and now_failed is not None and now_failed > failures:
                gateway = stack.find_child("gateway")
                log = f" (see {rel(gateway.log_path)})" if gateway is not None else ""
                return f"the gateway refused the edit{log}"
            if failures is None:
                failures = now_failed  # the gateway was restarting when the edit came
            stack.sleep(POLL_S)
        return f"the gateway did not switch to the edit within {timeout_s:.0f}s"
