"""cohortgate: a zero-trust A/B gateway for model endpoints.

The shared kernel lives here: `cohortgate.core` (pure decisions and the names every process shares),
`cohortgate.store` (state file and Redis), the controller, the dashboard, deployment renderers, the
local supervisor and the CLI. The data plane is the `gateway` package; models are served by `sidecar`.
"""

__version__ = "0.1.0"
