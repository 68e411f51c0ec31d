"""`cohortgate up` serves model references and enforces the route's trusted keys (issue 24).

The plan carries each route's ``trusted_keys`` and each backend's ``model:`` reference to the
sidecar recipe; the recipe's command line parses with the real CLI; and a sidecar started from
exactly that command line serves a version signed by the route's key and refuses one signed by
another (exits at start-up and says why).
"""

from __future__ import annotations

import json
import socket
import subprocess
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cohortgate.cli import build_parser
from cohortgate.core.contract import HEADER_MODEL_DIGEST, HEADER_MODEL_VERSION
from cohortgate.core.policy import parse_policy
from cohortgate.local.plan import StackError, effective_policy_data, local_model_file, sidecar_specs
from cohortgate.local.recipes import Layout, sidecar_recipe
from sidecar import repository, signing
from tests.sidecar.supply_helpers import keypair, push_versions

PIN = "@sha256:" + "ab" * 32


def policy_text(canary_model: str, keys: list[str], control_model: str = "models/control.onnx") -> str:
    return textwrap.dedent(
        f"""
        version: 1
        jwt: {{issuer: https://i, audience: a, algorithms: [ES256], jwks: jwks.json}}
        routes:
          - name: adder
            match: {{model: adder}}
            trusted_keys: {json.dumps(keys)}
            variants:
              - name: control
                weight: 90
                backends: [{{url: "http://127.0.0.1:18101", region: eu, model: "{control_model}"}}]
              - name: canary
                weight: 10
                backends: [{{url: "http://127.0.0.1:18102", region: eu, model: "{canary_model}"}}]
        """
    )


def layout(tmp_path: Path) -> Layout:
    return Layout(
        state_dir=tmp_path / "state",
        certs_dir=tmp_path / "certs",
        ports={"controller": 1, "dashboard": 2, "gateway_metrics": 3, "envoy": 4},
        processor_socket=str(tmp_path / "p.sock"),
        als_socket=str(tmp_path / "a.sock"),
        gateway_policy=tmp_path / "policy.yaml",
        controller_policy=tmp_path / "controller-policy.yaml",
    )


def test_recipes_pass_the_routes_trusted_keys_and_the_model_reference(tmp_path: Path) -> None:
    _, trusted = keypair(tmp_path)
    inline = signing.inline(trusted.key)
    reference = "file:///srv/store/adder/2"
    policy = parse_policy(policy_text(reference, [inline, "platform.pub"]), base_dir=tmp_path)
    specs = {s.variant: s for s in sidecar_specs(policy)}
    assert specs["canary"].model_path == reference  # a reference is passed as written
    assert specs["control"].model_path == str(tmp_path / "models" / "control.onnx")
    keys = (inline, str(tmp_path / "platform.pub"))  # a PEM path is resolved against the policy's directory
    assert specs["canary"].trusted_keys == specs["control"].trusted_keys == keys

    recipe = sidecar_recipe(specs["canary"], 18102, layout(tmp_path))
    assert recipe.cli_args is not None
    args = build_parser().parse_args(list(recipe.cli_args))  # the real CLI reads it as meant
    assert (args.model, args.trusted_key, args.port) == (reference, list(keys), 18102)
    assert recipe.info["model_path"] == reference and recipe.info["trusted_keys"] == 2


def test_a_route_without_keys_passes_none_and_a_key_change_is_another_sidecar(tmp_path: Path) -> None:
    plain = sidecar_specs(parse_policy(policy_text("m.onnx", []), base_dir=tmp_path))
    assert all("--trusted-key" not in sidecar_recipe(s, s.port, layout(tmp_path)).argv for s in plain)
    _, trusted = keypair(tmp_path)
    keyed = sidecar_specs(parse_policy(policy_text("m.onnx", [signing.inline(trusted.key)]), base_dir=tmp_path))
    # `up` keeps a sidecar across a reload only when its key is unchanged: new keys restart it
    assert {s.key for s in plain}.isdisjoint({s.key for s in keyed})


def test_one_url_cannot_serve_two_routes_with_different_keys(tmp_path: Path) -> None:
    _, a = keypair(tmp_path, "a")
    text = policy_text("m.onnx", [signing.inline(a.key)])
    second = textwrap.indent(
        textwrap.dedent(
            """\
            - name: other
              match: {model: other-adder}
              variants:
                - name: control
                  weight: 100
                  backends: [{url: "http://127.0.0.1:18101", region: eu, model: "models/control.onnx"}]
            """
        ),
        "  ",
    )
    policy = parse_policy(text + second.replace("other-adder", "adder2"), base_dir=tmp_path)
    with pytest.raises(StackError, match="one URL is one sidecar"):
        sidecar_specs(policy)


def test_local_model_file_is_what_up_can_check_or_build() -> None:
    assert local_model_file("/srv/models/tabular.onnx") == Path("/srv/models/tabular.onnx")
    assert local_model_file("/srv/models/tabular.onnx" + PIN) == Path("/srv/models/tabular.onnx")
    assert local_model_file("file:///srv/store/adder/2" + PIN) == Path("/srv/store/adder/2")
    assert local_model_file("file:///srv/store/adder/2") == Path("/srv/store/adder/2")
    assert local_model_file("https://models.example.com/adder.onnx" + PIN) is None
    assert local_model_file("s3://models/prod/adder/3") is None


def test_the_effective_policy_keeps_references_and_absolute_key_paths(tmp_path: Path) -> None:
    import yaml

    data = yaml.safe_load(policy_text("s3://models/prod/adder/3", ["ed25519:AAAA", "keys/platform.pub"]))
    data["routes"][0]["variants"][0]["backends"][0]["model"] = "models/control.onnx" + PIN
    out = effective_policy_data(data, tmp_path, {})
    route = out["routes"][0]
    assert route["trusted_keys"] == ["ed25519:AAAA", str(tmp_path / "keys" / "platform.pub")]
    assert route["variants"][1]["backends"][0]["model"] == "s3://models/prod/adder/3"
    assert route["variants"][0]["backends"][0]["model"] == str(tmp_path / "models" / "control.onnx") + PIN


# ------------------------------------------------------------------ a sidecar run from the recipe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready(port: int, proc: subprocess.Popen, timeout_s: float = 90.0) -> tuple[int, dict]:
    """Poll /v2/health/ready until it answers 200 or the process exits (a refused model ends it);
    the last answer otherwise. Generous: a cold onnxruntime import on a busy 2-core box takes seconds."""
    deadline = time.monotonic() + timeout_s
    last: tuple[int, dict] = (0, {})
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5) as r:
                return r.status, {}
        except urllib.error.HTTPError as exc:
            last = (exc.code, json.loads(exc.read() or b"{}"))  # 503 while loading
        except OSError:
            pass
        time.sleep(0.2)
    return last


@pytest.mark.parametrize("signed_by", ["platform", "rogue"])
def test_a_sidecar_started_from_the_recipe_serves_only_what_the_routes_key_signed(tmp_path: Path, signed_by) -> None:
    store = repository.DirectoryStore(tmp_path / "store")
    (info,) = push_versions(store, "adder", 1.0)
    platform_key, _ = keypair(tmp_path, "platform")
    rogue_key, _ = keypair(tmp_path, "rogue")
    repository.sign(store, "adder", "1", platform_key if signed_by == "platform" else rogue_key)
    reference = store.url("adder/1")
    policy = parse_policy(policy_text(reference, ["platform.pub"], control_model=reference), base_dir=tmp_path)
    spec = next(s for s in sidecar_specs(policy) if s.variant == "canary")
    port = free_port()
    lay = layout(tmp_path)
    lay.logs_dir.mkdir(parents=True)
    recipe = sidecar_recipe(spec, port, lay)
    argv = [*recipe.argv, "--model-cache", str(tmp_path / "cache")]  # not the user's cache
    with open(recipe.log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        status, body = ready(port, proc)
        if signed_by == "platform":
            assert status == 200, (body, recipe.log_path.read_text())
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v2/models/adder/infer",
                data=json.dumps(
                    {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
                ).encode(),
                headers={"content-type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=30) as r:
                answer = json.loads(r.read())
                assert r.headers[HEADER_MODEL_VERSION] == "adder/1"
                assert r.headers[HEADER_MODEL_DIGEST] == info.digest
            assert answer["outputs"][0]["data"] == [2.0, 3.0]
            # its log says which artifact serves from now on (issue 24: the digest to replay with)
            deadline = time.monotonic() + 60
            while f"model adder/1 ({info.digest})" not in recipe.log_path.read_text() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert f"model adder/1 ({info.digest})" in recipe.log_path.read_text()
        else:
            # refused at start-up: the sidecar exits and says why (`up` restarts it, then reports a crash loop)
            assert proc.wait(timeout=90) != 0 and status != 200
            assert "does not verify with any trusted key" in recipe.log_path.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_up_builds_the_demo_contract_the_quality_policy_names(tmp_path: Path) -> None:
    """policies/quality.yaml names models/tabular.contract.json beside the demo models: on a fresh
    clone `up` makes it with them (profiled from the training rows), and every sidecar reads it."""
    from cohortgate.local.stack import Stack, StackOptions
    from sidecar import contract

    root = Path(__file__).resolve().parents[2]
    (tmp_path / "policies").mkdir()
    policy = parse_policy((root / "policies/quality.yaml").read_text(), base_dir=tmp_path / "policies")
    specs = sidecar_specs(policy)
    assert {s.contract for s in specs} == {str(tmp_path / "models/tabular.contract.json")}
    Stack(StackOptions(policy=tmp_path / "policies/quality.yaml", state_dir=tmp_path / "state")).ensure_models(specs)
    spec = contract.parse(contract.read_file(tmp_path / "models/tabular.contract.json"))
    assert len(spec.inputs) == 30 and spec.inputs[0].name == "mean radius" and spec.mode == "observe"
    assert all(local_model_file(s.model_path).exists() for s in specs)  # type: ignore[union-attr]
