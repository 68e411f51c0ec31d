"""`cohortgate alerts render` and `cohortgate grafana render`: plug into the user's own monitoring.

Both write text rendered by `cohortgate.deploy` (rules: `cohortgate.deploy.alerts`, dashboards:
`cohortgate.deploy.grafana`); nothing here talks to Prometheus or Grafana. docs/observability.md
says where the files go.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cohortgate.support.durations import duration_arg


def register(subparsers: argparse._SubParsersAction) -> None:
    alerts = subparsers.add_parser("alerts", help="render Prometheus alerting rules")
    sub = alerts.add_subparsers(dest="alerts_command", required=True, metavar="ACTION")
    p = sub.add_parser(
        "render",
        help="write the Prometheus rule file (stdout by default)",
        description="Write Prometheus alerting rules for cohortgate: processor down and fail-closed 503s, "
        "denial spikes by code, SRM halts, rollbacks, sidecar saturation and gateways not following the "
        "store. Load the file with rule_files: in prometheus.yml (docs/observability.md).",
    )
    p.add_argument("--out", type=Path, default=None, help="the rule file (default: stdout)")
    p.add_argument("--denial-spike-ratio", type=float, default=None, help="5 min denial rate vs the hour before (3)")
    p.add_argument("--denial-min-rate", type=float, default=None, help="denials/s below which no spike (0.2)")
    p.add_argument("--queue-depth", type=int, default=None, help="sidecar queue depth that is saturation (64)")
    p.add_argument("--queue-p95", type=float, default=None, help="sidecar p95 batch wait in seconds (0.1)")
    p.add_argument(
        "--k8s",
        action="store_true",
        help="write a Prometheus Operator PrometheusRule manifest instead of a rule file",
    )
    p.add_argument("--namespace", default="cohortgate", help="with --k8s: the namespace (default cohortgate)")
    p.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --k8s: a label the operator's ruleSelector matches, e.g. release=kube-prometheus-stack",
    )
    p.set_defaults(func=_alerts_render)

    grafana = subparsers.add_parser("grafana", help="render a Grafana dashboard and its provisioning")
    gsub = grafana.add_subparsers(dest="grafana_command", required=True, metavar="ACTION")
    g = gsub.add_parser(
        "render",
        help="write the dashboard JSON and provisioning YAML into a directory",
        description="Write a provisionable Grafana dashboard over cohortgate's metrics (traffic, errors and "
        "latency per route and variant, effective weights, rollbacks, denials by code, shadow agreement, "
        "sidecar batches) with the datasource and dashboard-provider YAML Grafana reads at start.",
    )
    g.add_argument("--out", type=Path, default=Path("deploy/grafana"), help="directory (default deploy/grafana)")
    g.add_argument(
        "--prometheus-url", default="http://prometheus:9090", help="the datasource URL (default http://prometheus:9090)"
    )
    g.set_defaults(func=_grafana_render)
    v = gsub.add_parser(
        "preview",
        help="run the dashboard's queries against a Prometheus and write the panels as one HTML page",
        description="Run every panel's PromQL against a Prometheus (variables on All, the same interval "
        "substitutions Grafana makes) and write the panels on the dashboard's grid as a self-contained HTML "
        "page: a look at the dashboard where no Grafana runs. Panels without data say No data.",
    )
    v.add_argument("--prometheus-url", required=True, help="the Prometheus to query, e.g. http://127.0.0.1:9090")
    v.add_argument(
        "--out", type=Path, default=Path("grafana-preview.html"), help="the page (default grafana-preview.html)"
    )
    v.add_argument("--range", type=duration_arg, default=900.0, metavar="DURATION", help="time range (default 15m)")
    v.add_argument("--step", type=duration_arg, default=5.0, metavar="DURATION", help="resolution (default 5s)")
    v.add_argument(
        "--rate-interval", type=duration_arg, default=60.0, metavar="DURATION",
        help="what $__rate_interval becomes (default 1m: four scrapes at 15 s)",
    )  # fmt: skip
    v.set_defaults(func=_grafana_preview)


def _alerts_render(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from cohortgate.deploy.alerts import Thresholds, render

    t = Thresholds()
    overrides = {
        "denial_spike_ratio": args.denial_spike_ratio,
        "denial_min_rate": args.denial_min_rate,
        "sidecar_queue_depth": args.queue_depth,
        "sidecar_queue_p95_s": args.queue_p95,
    }
    t = replace(t, **{k: v for k, v in overrides.items() if v is not None})
    if args.k8s:
        from cohortgate.deploy.alerts import prometheus_rule

        labels = dict(item.partition("=")[::2] for item in args.label)
        text = prometheus_rule(t, namespace=args.namespace, labels=labels)
    else:
        text = render(t)
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0


def _grafana_preview(args: argparse.Namespace) -> int:
    import time
    import urllib.error

    from cohortgate.deploy.grafana import dashboard
    from cohortgate.deploy.grafana_preview import fetch, page

    try:
        panels = fetch(
            args.prometheus_url,
            dashboard(),
            end=time.time(),
            range_s=int(args.range),
            step_s=max(1, int(args.step)),
            rate_interval_s=int(args.rate_interval),
        )
    except (OSError, urllib.error.URLError, ValueError) as exc:
        print(f"cohortgate grafana preview: cannot query {args.prometheus_url}: {exc}", file=sys.stderr)
        return 1
    note = f"{sum(p.has_data for p in panels)} of {len(panels)} panels with data; Prometheus {args.prometheus_url}"
    args.out.write_text(page(panels, title="cohortgate (Grafana dashboard preview)", note=note))
    print(f"wrote {args.out} ({note})")
    return 0


def _grafana_render(args: argparse.Namespace) -> int:
    from cohortgate.deploy.grafana import write

    for path in write(args.out, prometheus_url=args.prometheus_url):
        print(f"wrote {path}")
    return 0
