"""cohortgate's data plane: the ext_proc processor in front of Envoy (auth, decisions, audit, reload)."""

from cohortgate import __version__

__all__ = ["__version__"]
