"""Deployment renderers: Envoy configuration, Kubernetes manifests, certificates."""
