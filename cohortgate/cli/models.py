"""`cohortgate models`: build the demo models; push, list, pull, sign and seal versioned artifacts."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="build the demo ONNX models; manage versioned, signed, sealed models")
    sub = parser.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    build = sub.add_parser(
        "build",
        help="train the tabular demo models on scikit-learn's bundled data and export them to ONNX",
    )
    build.add_argument("--out", default="models", help="directory to write into (default: models/)")
    build.add_argument("--force", action="store_true", help="rebuild models that already exist")
    build.set_defaults(func=build_handler)
    prof = sub.add_parser(
        "profile",
        help="write a model's data contract (types, ranges, reference sketches) from reference data",
    )
    prof.add_argument("model", help="the .onnx file")
    prof.add_argument("--data", required=True, metavar="FILE", help="reference data: a .parquet or .csv file")
    prof.add_argument("--out", metavar="FILE", help="where to write (default: M.contract.json beside M.onnx)")
    prof.add_argument("--bins", type=int, default=10, help="equal-mass histogram bins per numeric feature (default 10)")
    prof.add_argument(
        "--margin", type=float, default=0.1, help="widen each observed range by this share of its span (default 0.1)"
    )
    prof.add_argument("--mode", choices=("observe", "enforce"), default="observe", help="the contract's mode")
    prof.set_defaults(func=profile_handler)
    register_supply(sub)


def build_handler(args: argparse.Namespace) -> int:
    from sidecar.demo_models import DEMO_CONTRACT, build_models

    started = time.perf_counter()
    for model in build_models(args.out, force=args.force):
        what = "kept " if model.skipped else "built"
        accuracy = "" if model.accuracy is None else f"  held-out accuracy {model.accuracy:.3f}"
        print(f"{what} {model.path}  ({model.description}){accuracy}")
    print(f"the tabular models' data contract: {Path(args.out) / DEMO_CONTRACT}  (profiled from the training rows)")
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0


def profile_handler(args: argparse.Namespace) -> int:
    from cohortgate.support.files import write_atomic
    from sidecar import contract, profile
    from sidecar.errors import ModelLoadError
    from sidecar.model import OnnxModel

    if args.bins < 1 or args.margin < 0:
        print("cohortgate models profile: --bins must be at least 1 and --margin not negative", file=sys.stderr)
        return 2
    try:
        model = OnnxModel(args.model, device="cpu")
        doc = profile.profile(
            model.signature,
            model.run,
            profile.read_table(args.data),
            bins=args.bins,
            margin=args.margin,
            mode=args.mode,
        )
    except ModelLoadError as exc:
        print(f"cohortgate models profile: {exc}", file=sys.stderr)
        return 2
    out = args.out or str(contract.beside(args.model))
    write_atomic(out, profile.encode(doc))
    print(f"wrote {out}: {len(doc['inputs'])} input and {len(doc['outputs'])} output features, mode {doc['mode']}")
    return 0


# Model supply chain: a versioned store, signatures and sealing (sidecar/repository.py, docs/models.md).


def register_supply(sub: argparse._SubParsersAction) -> None:
    def store_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--store",
            required=True,
            metavar="URL",
            help="a directory, file:///dir or s3://bucket[/prefix] (endpoint: AWS_ENDPOINT_URL)",
        )

    def version_args(p: argparse.ArgumentParser) -> None:
        store_arg(p)
        p.add_argument("name", help="model name (one path segment)")
        p.add_argument("version", help="version (one path segment, e.g. 3 or 2026-12-03.1)")

    keygen = sub.add_parser("keygen", help="a new Ed25519 signing key pair, or a key-encryption key")
    keygen.add_argument("--out", required=True, help="signing: writes OUT.key (0600) and OUT.pub; --kek: OUT itself")
    keygen.add_argument("--kek", action="store_true", help="write a 32-byte AES key-encryption key instead")
    keygen.set_defaults(func=keygen_handler)

    push = sub.add_parser("push", help="upload a model as NAME/VERSION with its manifest")
    version_args(push)
    push.add_argument("--model", required=True, metavar="FILE", help="the plain .onnx file")
    push.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    push.add_argument("--data-contract", metavar="JSON_FILE", help="the data contract to record in the manifest")
    push.add_argument("--force", action="store_true", help="overwrite an existing version (drops its signature)")
    push.set_defaults(func=push_handler)

    listing = sub.add_parser("list", help="versions in a store: digest, size, signed, sealed, reference")
    store_arg(listing)
    listing.add_argument("name", nargs="?", help="only this model")
    listing.set_defaults(func=list_handler)

    pull = sub.add_parser("pull", help="verify a version and write it to a file")
    version_args(pull)
    pull.add_argument("--out", required=True, metavar="FILE", help="where to write the verified model")
    pull.add_argument("--trusted-key", action="append", default=[], metavar="KEY", help="ed25519:<b64> or a PEM")
    pull.add_argument("--kek", metavar="SPEC", help="file:PATH | env:NAME | cmd:COMMAND: write the plain model")
    pull.set_defaults(func=pull_handler)

    sign = sub.add_parser("sign", help="sign a version's manifest (detached Ed25519)")
    version_args(sign)
    sign.add_argument("--key", required=True, metavar="PRIVATE_PEM", help="the Ed25519 private key to sign with")
    sign.set_defaults(func=sign_handler)

    seal = sub.add_parser("seal", help="encrypt a version's model at rest (AES-256-GCM, wrapped data key)")
    version_args(seal)
    seal.add_argument("--kek", required=True, metavar="SPEC", help="file:PATH | env:NAME | cmd:COMMAND")
    seal.set_defaults(func=seal_handler)

    verify = sub.add_parser("verify", help="load a reference as the sidecar would, and print what it is")
    verify.add_argument("reference", help="the model reference to check (NAME@VERSION, file://, https:// or s3://)")
    verify.add_argument(
        "--trusted-key", action="append", default=[], metavar="KEY", help="a public key the signature may be from"
    )
    verify.add_argument("--kek", metavar="SPEC", help="file:PATH | env:NAME | cmd:COMMAND, to open a sealed model")
    verify.set_defaults(func=verify_handler)


def _supply(fn):  # a decorator: refusals become one sentence and status 2
    def wrapped(args: argparse.Namespace) -> int:
        from sidecar.errors import ModelLoadError

        try:
            return fn(args)
        except ModelLoadError as exc:
            print(f"cohortgate models {args.models_command}: {exc}", file=sys.stderr)
            return 2

    return wrapped


@_supply
def keygen_handler(args: argparse.Namespace) -> int:
    from cohortgate.support.files import write_atomic
    from sidecar import sealing, signing

    if args.kek:
        write_atomic(args.out, sealing.new_kek(), mode=0o600)
        print(f"wrote key-encryption key {args.out} (0600); use --kek file:{args.out}")
        return 0
    private_pem, public_pem = signing.generate()
    write_atomic(f"{args.out}.key", private_pem, mode=0o600)
    write_atomic(f"{args.out}.pub", public_pem)
    from cryptography.hazmat.primitives import serialization

    public = serialization.load_pem_public_key(public_pem)
    print(f"wrote {args.out}.key (0600) and {args.out}.pub")
    print(f"trusted key for a policy: {signing.inline(public)}")  # type: ignore[arg-type]
    return 0


@_supply
def push_handler(args: argparse.Namespace) -> int:
    from sidecar import repository
    from sidecar.errors import ArtifactRefused

    metadata = {}
    for item in args.metadata:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ArtifactRefused("manifest", f"--metadata wants KEY=VALUE, not {item!r}")
        metadata[key] = value
    try:
        model = Path(args.model).read_bytes()
    except OSError as exc:
        raise ArtifactRefused("fetch", f"cannot read {args.model}: {exc.strerror}") from None
    info = repository.push(
        repository.open_store(args.store),
        args.name,
        args.version,
        model,
        metadata=metadata,
        data_contract=repository.data_contract_from(args.data_contract),
        force=args.force,
    )
    print(f"pushed {info.name}/{info.version} ({info.size} bytes, {info.digest})")
    print(f"reference: {info.reference}")
    return 0


@_supply
def list_handler(args: argparse.Namespace) -> int:
    from sidecar import repository

    rows = repository.list_versions(repository.open_store(args.store), args.name)
    for v in rows:
        flags = ",".join(f for f, on in (("signed", v.signed), ("sealed", v.sealed)) if on) or "-"
        print(f"{v.name}/{v.version}\t{v.size}\t{flags}\t{v.reference}")
    if not rows:
        print("no versions", file=sys.stderr)
    return 0


@_supply
def pull_handler(args: argparse.Namespace) -> int:
    from sidecar import repository, sealing, signing

    artifact = repository.pull(
        repository.open_store(args.store),
        args.name,
        args.version,
        args.out,
        trusted_keys=tuple(signing.load_trusted_key(k) for k in args.trusted_key),
        kek=sealing.load_kek(args.kek) if args.kek else None,
    )
    state = "sealed (give --kek to write it plain)" if artifact.model == b"" and artifact.sealed else "verified"
    print(f"wrote {args.out}: {artifact.version} {artifact.digest}, {state}")
    return 0


@_supply
def sign_handler(args: argparse.Namespace) -> int:
    from sidecar import repository

    key_id = repository.sign(repository.open_store(args.store), args.name, args.version, args.key)
    print(f"signed {args.name}/{args.version} with key {key_id}")
    return 0


@_supply
def seal_handler(args: argparse.Namespace) -> int:
    from sidecar import repository, sealing

    repository.seal(repository.open_store(args.store), args.name, args.version, sealing.load_kek(args.kek))
    print(f"sealed {args.name}/{args.version} (AES-256-GCM, data key wrapped by {args.kek.split(':', 1)[0]})")
    return 0


@_supply
def verify_handler(args: argparse.Namespace) -> int:
    from sidecar import artifacts, sealing, signing

    artifact = artifacts.load_artifact(
        args.reference,
        trusted_keys=tuple(signing.load_trusted_key(k) for k in args.trusted_key),
        kek=sealing.load_kek(args.kek) if args.kek else None,
    )
    signed = f"signed by {artifact.signed_by}" if artifact.signed_by else "not signed"
    timings = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in artifact.timings.items())
    print(f"ok: {artifact.label} {artifact.digest} ({len(artifact.model)} bytes, {signed}, ", end="")
    print(f"{'sealed' if artifact.sealed else 'not sealed'}; {timings})")
    return 0
