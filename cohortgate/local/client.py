"""What a client app of a local stack needs: the stack's `run.json`, an mTLS context, tokens, OIP bodies.

`cohortgate call` and `cohortgate traffic` call through Envoy exactly as an application would:
a client certificate from the stack's CA (the SPIFFE identity the policy authorises) and a bearer
token signed by the stack's dev signing key. Only the standard library and `cohortgate.deploy.pki` are
imported here, so `call` starts in a few tens of milliseconds.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cohortgate.core.errors import CohortgateError

RUN_FILE = "run.json"
DEFAULT_STATE_DIR = ".cohortgate"
DEFAULT_CLIENT = "app-demo"
DEFAULT_SCOPES = ("predict",)
INPUT_NAME = "input"
FEATURES = 30

# Two rows of scikit-learn's bundled breast-cancer data (the demo models' training set): the
# first record (malignant, label 0) and the first benign one (label 1).
DEMO_ROWS: tuple[tuple[float, ...], ...] = (
    (17.99, 10.38, 122.8, 1001.0, 0.1184, 0.2776, 0.3001, 0.1471, 0.2419, 0.07871,
     1.095, 0.9053, 8.589, 153.4, 0.006399, 0.04904, 0.05373, 0.01587, 0.03003, 0.006193,
     25.38, 17.33, 184.6, 2019.0, 0.1622, 0.6656, 0.7119, 0.2654, 0.4601, 0.1189),
    (13.54, 14.36, 87.46, 566.3, 0.09779, 0.08129, 0.06664, 0.04781, 0.1885, 0.05766,
     0.2699, 0.7886, 2.058, 23.56, 0.008462, 0.0146, 0.02387, 0.01315, 0.0198, 0.0023,
     15.11, 19.26, 99.7, 711.2, 0.144, 0.1773, 0.239, 0.1288, 0.2977, 0.07259),
)  # fmt: skip


class StackNotRunning(CohortgateError):
    """No readable ``run.json``: `cohortgate up` is not running from that state directory."""


@dataclass(frozen=True, slots=True)
class StackInfo:
    """The parts of ``run.json`` a client needs."""

    gateway_url: str  # https://127.0.0.1:PORT (Envoy)
    host: str
    port: int
    ca: Path
    certs_dir: Path
    clients: Mapping[str, tuple[Path, Path]]
    controller_api: str | None
    raw: Mapping[str, Any]

    @classmethod
    def load(cls, state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR) -> StackInfo:
        path = Path(state_dir) / RUN_FILE
        try:
            raw = json.loads(path.read_text())
            pid = int(raw["pid"])
            url = raw["endpoints"]["gateway"]
            certs = raw["certs"]
            parts = urlsplit(url)
            info = cls(
                gateway_url=url,
                host=parts.hostname or "127.0.0.1",
                port=parts.port or 443,
                ca=Path(certs["ca"]),
                certs_dir=Path(certs["dir"]),
                clients={n: (Path(c["cert"]), Path(c["key"])) for n, c in certs["clients"].items()},
                controller_api=raw["endpoints"].get("controller_api"),
                raw=raw,
            )
        except FileNotFoundError:
            raise StackNotRunning(
                f"{path} not found: start the stack with `cohortgate up` (or pass --state-dir)"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StackNotRunning(f"{path} is not a readable run file: {exc}") from None
        if not pid_alive(pid):
            raise StackNotRunning(f"{path} is stale: `cohortgate up` (pid {pid}) is gone; start it again")
        return info

    def client_pair(self, name: str = DEFAULT_CLIENT) -> tuple[Path, Path]:
        try:
            return self.clients[name]
        except KeyError:
            known = ", ".join(sorted(self.clients)) or "none"
            raise StackNotRunning(f"no client certificate {name!r} in {self.certs_dir} (have: {known})") from None


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ssl_context(info: StackInfo, client: str | None = DEFAULT_CLIENT) -> ssl.SSLContext:
    """TLS that trusts only the stack's CA and presents ``client``'s certificate (None: none)."""
    ctx = ssl.create_default_context(cafile=str(info.ca))
    if client is not None:
        cert, key = info.client_pair(client)
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def token_minter(info: StackInfo):
    """``mint(sub, residency=None, scopes=("predict",), claims=None, ttl_s=900) -> str`` for this stack."""
    from cohortgate.deploy import pki

    paths = pki.load_cert_paths(info.certs_dir)

    def mint(
        sub: str,
        residency: str | None = None,
        scopes: Iterable[str] = DEFAULT_SCOPES,
        claims: Mapping[str, Any] | None = None,
        ttl_s: float = 900,
    ) -> str:
        return pki.mint_token(paths, sub, residency=residency, scopes=scopes, claims=claims, ttl_s=ttl_s)

    return mint


def infer_path(model: str) -> str:
    return f"/v2/models/{model}/infer"


def oip_body(rows: Sequence[Sequence[float]], name: str = INPUT_NAME) -> dict[str, Any]:
    """An OIP v2 JSON infer request: one FP32 tensor ``[len(rows), features]``, row-major."""
    width = len(rows[0]) if rows else 0
    if any(len(r) != width for r in rows):
        raise ValueError("every row must have the same number of features")
    return {
        "inputs": [
            {
                "name": name,
                "shape": [len(rows), width],
                "datatype": "FP32",
                "data": [float(v) for r in rows for v in r],
            }
        ]
    }


def demo_body() -> dict[str, Any]:
    """The tabular demo model's input: one row, shape ``[1, 30]``."""
    return oip_body([DEMO_ROWS[0]])


def parse_input(text: str) -> dict[str, Any]:
    """``--input``: a full OIP body (``{"inputs": ...}``), one row of numbers, or a list of rows.

    ``@FILE`` reads the JSON from a file. ValueError says what was wrong.
    """
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--input is not JSON: {exc}") from None
    if isinstance(value, dict):
        if not isinstance(value.get("inputs"), list):
            raise ValueError('--input as an object must be an OIP body with an "inputs" list')
        return value
    if isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
        return oip_body([value])
    if isinstance(value, list) and value and all(isinstance(r, list) for r in value):
        return oip_body(value)
    raise ValueError("--input must be an OIP body, a row of numbers, or a list of rows")


def describe_audit(record: Mapping[str, Any]) -> str:
    """One line for a controller audit record: what happened to which variant, and why."""
    what = f"{record.get('action', '?')} {record.get('route', '?')}/{record.get('variant') or '*'}"
    if record.get("from") and record.get("to"):
        what += f" ({record['from']} -> {record['to']})"
    weights = record.get("weights_after")
    if isinstance(weights, Mapping) and weights:
        what += ", weights " + " ".join(f"{k} {v}" for k, v in weights.items())
    if record.get("reason"):
        what += f": {record['reason']}"
    if record.get("actor"):
        what += f" [{record['actor']}]"
    return what


def describe_supervision(run: Mapping[str, Any]) -> list[str]:
    """`cohortgate status`'s lines about `up`'s children: restarts, and any left down in a crash loop."""
    children = run.get("children")
    if not isinstance(children, Mapping) or not children:
        return []
    restarted, failed, down = [], [], []
    for name, child in children.items():
        if not isinstance(child, Mapping):
            continue
        state, restarts = child.get("state", "ready"), int(child.get("restarts") or 0)
        last = child.get("last_exit") or "?"
        if state == "failed":
            failed.append(f"{name} left down after {restarts} restarts (crash loop; last exit: {last})")
        elif state in ("backoff", "starting") and restarts:
            down.append(f"{name} restarting (restart {restarts}; last exit: {last})")
        elif restarts:
            back = child.get("last_recovery_s")
            took = f", back in {back:.1f}s" if isinstance(back, int | float) else ""
            restarted.append(f"{name} restarted {restarts}x (last exit: {last}{took})")
    total = sum(int(c.get("restarts") or 0) for c in children.values() if isinstance(c, Mapping))
    head = f"supervisor: `cohortgate up` pid {run.get('pid', '?')}, {len(children)} children, {total} restarts"
    return [head, *(f"  {line}" for line in failed + down + restarted)]
