"""`cohortgate experiment plan`: how many units and how long an experiment needs, before it starts."""

from __future__ import annotations

import argparse
import json
import sys


def _split(text: str) -> tuple[float, ...]:
    from cohortgate.core.plan import parse_split

    try:
        return parse_split(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("experiment", help="plan experiments on outcome metrics")
    cmds = parser.add_subparsers(dest="experiment_command", required=True, metavar="ACTION")
    plan = cmds.add_parser(
        "plan",
        help="sample size and duration for a minimum detectable effect",
        description="Units and time needed to detect --mde with --power, for a fixed-horizon test and for the "
        "always-valid sequence the controller watches (and what looking at any time costs).",
    )
    plan.add_argument("--baseline", type=float, required=True, help="control's value: a rate for binary metrics")
    plan.add_argument("--mde", type=float, required=True, help="minimum detectable effect, relative (0.02: +2 %%)")
    plan.add_argument("--absolute", action="store_true", help="read --mde as an absolute change instead")
    plan.add_argument("--kind", choices=("binary", "mean", "ratio"), default="binary", help="the metric's kind")
    plan.add_argument("--sd", type=float, help="per-unit standard deviation (mean and ratio metrics)")
    plan.add_argument("--rps", type=float, required=True, help="requests per second on the route")
    plan.add_argument("--per-unit", type=float, default=1.0, metavar="R", help="requests per unit (default 1)")
    plan.add_argument(
        "--split", type=_split, default=(50.0, 50.0), help="weights, control first, e.g. 90/10 or 80/10/10"
    )
    plan.add_argument("--alpha", type=float, default=0.05, help="false-positive rate, two-sided (default 0.05)")
    plan.add_argument("--power", type=float, default=0.8, help="chance to detect the effect (default 0.8)")
    plan.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between looks (default 1)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=_plan)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 120:
        return f"{minutes:.0f} min"
    hours = minutes / 60
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def _plan(args: argparse.Namespace) -> int:
    from cohortgate.core.plan import plan

    try:
        p = plan(
            args.baseline,
            args.mde,
            kind=args.kind,
            sd=args.sd,
            relative=not args.absolute,
            rps=args.rps,
            split=args.split,
            alpha=args.alpha,
            power=args.power,
            requests_per_unit=args.per_unit,
            interval_s=args.interval,
        )
    except ValueError as exc:
        print(f"cohortgate experiment plan: {exc}", file=sys.stderr)
        return 2
    f1 = p.challenger_fraction
    if args.json:
        print(
            json.dumps(
                {
                    "kind": p.kind,
                    "baseline": p.baseline,
                    "target": p.target,
                    "alpha_per_challenger": p.alpha,
                    "power": p.power,
                    "challengers": p.challengers,
                    "units_per_s": p.units_per_s,
                    "fixed_horizon": {"units": p.units_fixed, "seconds": p.seconds_fixed},
                    "always_valid": {"units": p.units_sequential, "seconds": p.seconds_sequential},
                    "price": p.price,
                    "looks": p.looks,
                },
                indent=2,
            )
        )
        return 0
    pct = p.kind == "binary"
    value = (lambda v: f"{v:.2%}") if pct else (lambda v: f"{v:g}")
    split = "/".join(f"{w:g}" for w in args.split)
    print(f"metric         {p.kind}: {value(p.baseline)} -> {value(p.target)} ({p.target / p.baseline - 1:+.1%})")
    print(f"traffic        {args.rps:g} req/s, {args.per_unit:g} per unit, split {split}: {p.units_per_s:g} units/s")
    print(
        f"test           alpha {p.alpha:g} per challenger ({p.challengers} challenger"
        f"{'s' if p.challengers > 1 else ''}, two-sided), power {p.power:.0%}"
    )
    print(f"{'':15}{'units (both arms)':>18}{'challenger':>14}{'duration':>14}")
    for name, units, seconds in (
        ("fixed horizon", p.units_fixed, p.seconds_fixed),
        ("always valid", p.units_sequential, p.seconds_sequential),
    ):
        print(f"{name:15}{units:>18,}{round(units * f1):>14,}{_duration(seconds):>14}")
    print(
        f"always-valid inference costs {p.price:.2f}x the units of a single look at the end; in exchange the "
        "controller may look every interval and stop as soon as the effect is clear"
    )
    return 0
