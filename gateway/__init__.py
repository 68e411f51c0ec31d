"""cohortgate's gateway: policy, decisions, and the adapters that put them in front of Envoy."""

__version__ = "0.1.0"
