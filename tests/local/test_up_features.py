"""`cohortgate up` starts the sidecars of a route with ``features:`` joining them (issue 22), without a process:
the plan gives each joining variant the block and the file that declares it, the recipe passes them as the
sidecar's ``--features-policy``/``--features-route``, and the sidecar's own flag parsing reads them back."""

from __future__ import annotations

from pathlib import Path

import yaml

from cohortgate.core.policy import load_policy
from cohortgate.local.plan import effective_policy_data, sidecar_specs
from cohortgate.local.recipes import Layout, sidecar_recipe
from sidecar.cli import _features
from sidecar.join import JoinSettings

SECRET = "s3cret-store-password"

POLICY = f"""
version: 1
jwt: {{issuer: iss, audience: aud, jwks: jwks.json}}
routes:
  - name: shop
    match: {{model: shop}}
    residency: {{default_region: eu}}
    variants:
      - name: control
        weight: 50
        backends: [{{url: "http://127.0.0.1:8201", region: eu, model: models/global.onnx}}]
      - name: personal
        weight: 50
        backends: [{{url: "http://127.0.0.1:8202", region: eu, model: models/personal.onnx}}]
    features:
      store: redis://:{SECRET}@127.0.0.1:6379/0
      project: cgdemo
      join_key: user_id
      entity: {{claim: sub}}
      entity_type: int64
      views: [user_stats:clicks_7d, user_stats:ctr_7d]
      fallback: {{model: models/global.onnx}}
      variants: [personal]
  - name: plain
    match: {{model: plain}}
    residency: {{default_region: eu}}
    variants:
      - {{name: only, weight: 100, backends: [{{url: "http://127.0.0.1:8203", region: eu, model: models/plain.onnx}}]}}
"""


def layout(state: Path) -> Layout:
    return Layout(
        state_dir=state,
        certs_dir=state / "certs",
        ports={"controller": 19480, "dashboard": 19481, "gateway_metrics": 19482, "envoy": 18443},
        processor_socket=str(state / "processor.sock"),
        als_socket=str(state / "als.sock"),
        gateway_policy=state / "policy.json",
        controller_policy=state / "controller-policy.json",
        python="/venv/bin/python",
    )


def flag(argv: tuple[str, ...], name: str) -> str:
    assert name in argv, argv
    return argv[argv.index(name) + 1]


def write(tmp_path: Path, text: str = POLICY) -> Path:
    (tmp_path / "conf").mkdir(exist_ok=True)
    path = tmp_path / "conf" / "policy.yaml"
    path.write_text(text)
    return path


def test_only_the_variants_that_join_get_the_features_flags_and_the_sidecar_reads_them_back(tmp_path: Path) -> None:
    source = write(tmp_path)
    specs = {s.variant: s for s in sidecar_specs(load_policy(source))}
    recipes = {v: sidecar_recipe(s, 40000 + i, layout(tmp_path / "state")) for i, (v, s) in enumerate(specs.items())}

    personal = recipes["personal"].argv
    assert flag(personal, "--features-policy") == str(source)  # the file up validated, not the effective one
    assert flag(personal, "--features-route") == "shop" and flag(personal, "--variant") == "personal"
    assert recipes["personal"].info["features"] is True
    for other in ("control", "only"):  # not in features.variants / a route without features
        assert "--features-policy" not in recipes[other].argv and "--features-route" not in recipes[other].argv
        assert recipes[other].info["features"] is False
    for recipe in recipes.values():  # the store's password never reaches a command line or run.json
        assert SECRET not in " ".join(recipe.argv) and SECRET not in repr(dict(recipe.info))

    # What the sidecar makes of its flags: the route's block, the fallback resolved beside the source file.
    cli = recipes["personal"].cli_args
    assert cli is not None
    settings = _features(flag(cli, "--features-policy"), flag(cli, "--features-route"), flag(cli, "--variant"))
    assert isinstance(settings, JoinSettings)
    assert settings == JoinSettings.from_features(specs["personal"].features)  # type: ignore[arg-type]
    assert settings.fallback_model == str((tmp_path / "conf" / "models" / "global.onnx").resolve())
    assert settings.spec.views == ("user_stats:clicks_7d", "user_stats:ctr_7d") and settings.entity_type == "int64"


def test_an_edited_features_block_restarts_only_the_sidecars_that_join(tmp_path: Path) -> None:
    before = {s.variant: s.key for s in sidecar_specs(load_policy(write(tmp_path)))}
    edited = POLICY.replace("views: [user_stats:clicks_7d, user_stats:ctr_7d]", "views: [user_stats:clicks_7d]")
    after = {s.variant: s.key for s in sidecar_specs(load_policy(write(tmp_path, edited)))}
    assert after["personal"] != before["personal"]  # a new key: live policy starts a new sidecar, retires the old
    assert after["control"] == before["control"] and after["only"] == before["only"]


def test_the_effective_policy_resolves_the_fallback_model_beside_the_source(tmp_path: Path) -> None:
    data = yaml.safe_load(POLICY)
    out = effective_policy_data(data, tmp_path / "conf", {})
    fallback = out["routes"][0]["features"]["fallback"]
    assert fallback == {"model": str((tmp_path / "conf" / "models" / "global.onnx").resolve())}
    assert data["routes"][0]["features"]["fallback"] == {"model": "models/global.onnx"}  # input untouched
    data["routes"][0]["features"]["fallback"] = {"model": "https://models.example/global.onnx@sha256:" + "0" * 64}
    kept = effective_policy_data(data, tmp_path / "conf", {})["routes"][0]["features"]["fallback"]["model"]
    assert kept.startswith("https://")  # a reference is kept as written
