"""Errors the sidecar answers with: each carries its HTTP status and becomes ``{"error": "..."}``.

    CohortgateError                      (gateway/errors.py)
    ├── ModelLoadError                   the model cannot be served (missing, invalid, no CUDA); the
    │   │                                CLI prints it and exits 2, ``ready`` never turns true
    │   └── ArtifactRefused              the artifact failed a supply-chain check (digest, signature,
    │                                    key, size, fetch); ``reason`` labels the refusal metric
    └── SidecarError                     a user-visible answer: HTTP status + sentence
        ├── BadRequest          400      body is not JSON, or a tensor does not fit the signature
        ├── NotFound            404      unknown model, version or route
        ├── MethodNotAllowed    405      known route, wrong method
        ├── PayloadTooLarge     413      body over ``--max-body-bytes``
        ├── ContractViolation   422      inputs break an enforced data contract (``sidecar/contract.py``):
        │                                ``code``, ``feature`` and ``rule`` beside ``error``
        ├── InferenceFailed     500      onnxruntime failed (translated in ``model.py``) or a fault
        ├── Unavailable         503      queue full, not ready, or shutting down (with Retry-After)
        └── shm.SharedMemoryError        the shared-memory extension's refusals, 400/403/404/409 with a
                                         ``code`` (their tree is in ``sidecar/shm.py``)

Anything else that escapes a handler is internal: the server logs it and answers 500 with a fixed
sentence, never a stack trace.
"""

from __future__ import annotations

from cohortgate.core.errors import CohortgateError


class ModelLoadError(CohortgateError):
    """The model cannot be served: missing file, invalid graph, unsupported types, or no CUDA."""


class ArtifactRefused(ModelLoadError):
    """A model artifact failed a check (``sidecar/artifacts.py``); ``reason`` is a metric label."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class SidecarError(CohortgateError):
    """An error a client should see; ``status`` is the HTTP status of the answer."""

    status = 500

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)

    @property
    def details(self) -> dict[str, str] | None:
        """Fields the JSON answer carries beside ``error`` (a stable ``code``...); None: the sentence only."""
        return None


class BadRequest(SidecarError):
    status = 400


class NotFound(SidecarError):
    status = 404


class MethodNotAllowed(SidecarError):
    """``allow`` becomes the Allow header."""

    status = 405

    def __init__(self, message: str, allow: str = "") -> None:
        super().__init__(message)
        self.allow = allow


class PayloadTooLarge(SidecarError):
    status = 413


class InferenceFailed(SidecarError):
    status = 500


class Unavailable(SidecarError):
    """Temporarily refused; ``retry_after_s`` becomes the Retry-After header."""

    status = 503

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
