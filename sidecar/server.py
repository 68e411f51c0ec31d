"""The sidecar's HTTP face: the OIP v2 REST routes on aiohttp, and a graceful drain.

A thin adapter: handlers read bytes, call ``protocol`` to decode and encode, ``Batcher`` to run, and
turn every ``SidecarError`` into ``{"error": "..."}`` with its status. Anything unexpected is logged
and answered with a fixed 500 sentence; unknown routes and wrong methods are JSON 404/405 too, so
tritonclient can parse every error.

Lifecycle: the port opens at once (``live``); the model loads and warms up in the executor thread,
then ``ready`` turns true. On shutdown the listener closes, ``ready`` turns false, requests already
in flight and queued finish, then the batcher, reporter and executor stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from cohortgate import __version__
from cohortgate.core.contract import (
    HEADER_CLUSTER,
    HEADER_ENTITY,
    HEADER_FEATURES,
    HEADER_MODEL_DIGEST,
    HEADER_MODEL_VERSION,
    HEADER_SEGMENT,
    HEADER_SERVED_BY,
)
from cohortgate.support.files import changes
from sidecar import artifacts, serving, shm
from sidecar import contract as data_contract
from sidecar.artifacts import DEFAULT_MAX_BYTES, Artifact, ArtifactMetrics
from sidecar.batching import Batcher, BatchTiming
from sidecar.errors import (
    ArtifactRefused,
    InferenceFailed,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    SidecarError,
    Unavailable,
)
from sidecar.faults import FaultInjector
from sidecar.join import Joined, Joiner, JoinSettings
from sidecar.metrics import SidecarMetrics
from sidecar.model import DEVICES, OnnxModel
from sidecar.openapi import OPENAPI_PATH
from sidecar.openapi import build as build_openapi
from sidecar.protocol import (
    BINARY_CONTENT_TYPE,
    HEADER_LENGTH,
    JSON_CONTENT_TYPE,
    Signature,
    decode_infer_request,
    encode_infer_response,
    error_body,
)
from sidecar.quality import QualityGate
from sidecar.report import QualityReporter, Reporter, ReportSink, sink_from_url
from sidecar.tracing import open_tracing, record_infer

log = logging.getLogger(__name__)

REQUEST_ID = "x-request-id"
SERVER_NAME = "cohortgate-sidecar"
EXTENSIONS = ("binary_tensor_data", "model_configuration")
_INTERNAL = "internal error in the sidecar; see its log"
REPORT_SCHEMES = ("http://", "https://", "redis://", "rediss://", "unix://")


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    """Everything one sidecar needs; ``cohortgate sidecar`` flags map one to one."""

    model_path: str
    name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int | None = None  # OIP v2 gRPC (sidecar/grpc_service.py) on this port too; 0: any free one
    device: str = "auto"
    max_batch_size: int = 64  # rows; 1 turns batching off
    max_queue_delay_ms: float = 0.0  # 0 = greedy
    inline_max_us: float = 0.0  # opt-in: a lone one-row request of a model this fast skips the executor
    max_queue: int = 1024
    max_body_bytes: int = 64 * 1024 * 1024
    intra_op_threads: int | None = None  # None = all cores but the event loop's
    report_to: str | None = None
    variant: str | None = None
    report_predictions: bool = False  # reports carry the served prediction (top class or value), for labels
    fault_rate: float = 0.0
    fault_after_s: float = 0.0  # healthy this long before the faults start
    drain_timeout_s: float = 30.0
    # Model supply chain (sidecar/artifacts.py): model_path is a reference, see docs/models.md.
    trusted_keys: tuple[str, ...] = ()  # ed25519:<b64> or public-key PEM paths; set: only signed versions serve
    kek: str | None = None  # file:PATH | env:NAME | cmd:COMMAND, for sealed artifacts
    model_cache_dir: str | None = None  # default ~/.cache/cohortgate/models
    model_max_bytes: int = DEFAULT_MAX_BYTES
    model_file: str | None = None  # holds the reference; an edit swaps the model live
    model_poll_s: float = 1.0
    otlp_endpoint: str | None = None  # an OTLP/HTTP collector: one span per inference (off when None)
    trace_ratio: float = 0.01  # share of requests without a sampled traceparent to trace
    # Data contract (sidecar/contract.py): a JSON file; default the manifest's, else M.contract.json beside M.onnx.
    contract: str | None = None
    contract_mode: str | None = None  # enforce | observe; None: the contract's own mode
    quality_interval_s: float = 10.0  # one quality report (drift sketches, violations) per window this long
    route: str | None = None  # the policy route this sidecar serves, named in its quality reports
    features: JoinSettings | None = None  # online features joined into the input (sidecar/join.py)
    executor_socket: str | None = None  # `--workers N`: a front; the model runs in this executor (sidecar/workers.py)
    # System shared memory (sidecar/shm.py): off unless set; only for clients on this host.
    shared_memory: bool = False
    shared_memory_max_regions: int = shm.DEFAULT_MAX_REGIONS

    def __post_init__(self) -> None:
        problems = []
        if self.device not in DEVICES:
            problems.append(f"device must be one of {', '.join(DEVICES)}")
        if self.max_batch_size < 1:
            problems.append("max_batch_size must be at least 1")
        if self.max_queue_delay_ms < 0:
            problems.append("max_queue_delay_ms must not be negative")
        if self.inline_max_us < 0:
            problems.append("inline_max_us must not be negative")
        if self.max_queue < 1:
            problems.append("max_queue must be at least 1")
        if self.max_body_bytes < 1:
            problems.append("max_body_bytes must be at least 1")
        if not 0.0 <= self.fault_rate <= 1.0:
            problems.append("fault_rate must be within [0, 1]")
        if self.report_to and not self.variant:
            problems.append("report_to needs a variant")
        if self.report_to and not self.report_to.startswith(REPORT_SCHEMES):
            problems.append(f"report_to must start with one of {', '.join(REPORT_SCHEMES)}")
        if self.model_max_bytes < 1:
            problems.append("model_max_bytes must be at least 1")
        if self.model_file and self.model_poll_s <= 0:
            problems.append("model_poll_s must be positive")
        if not 0 <= self.port <= 65535:
            problems.append("port must be within 0..65535")
        if self.grpc_port is not None and not 0 <= self.grpc_port <= 65535:
            problems.append("grpc_port must be within 0..65535")
        if self.contract_mode is not None and self.contract_mode not in data_contract.MODES:
            problems.append(f"contract_mode must be one of {', '.join(data_contract.MODES)}")
        if self.quality_interval_s <= 0:
            problems.append("quality_interval_s must be positive")
        if self.shared_memory_max_regions < 1:
            problems.append("shared_memory_max_regions must be at least 1")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def model_name(self) -> str:
        return self.name or serving.model_name(self.model_path)


class Sidecar:
    """The state behind the routes of one served model."""

    def __init__(self, config: SidecarConfig, report_sink: ReportSink | None = None) -> None:
        self.config = config
        self.name = config.model_name
        self.served_by = config.variant or self.name
        self.metrics = SidecarMetrics(self.name)
        self.model: OnnxModel | None = None
        self.batcher: Batcher | None = None
        self.artifact: Artifact | None = None  # what is served: version, digest, load timings
        self.reference = config.model_path
        self.artifact_metrics = ArtifactMetrics(self.name)
        self.metrics.registry.register(self.artifact_metrics)
        self._swap_lock = asyncio.Lock()
        self.reporter: Reporter | None = None
        self.quality: QualityGate | None = None  # the data contract at work, when the model has one
        self.quality_reporter: QualityReporter | None = None
        self.ready = False
        self.grpc_port: int | None = None  # the bound gRPC port once serving (--grpc-port 0 picks one)
        self.load_error: str | None = None
        self._report_sink = report_sink
        self.tracing = open_tracing(config.otlp_endpoint, config.trace_ratio)  # None: no span, no import
        self._faults = FaultInjector(config.fault_rate, config.fault_after_s) if config.fault_rate > 0 else None
        self._executor: ThreadPoolExecutor | None = None
        self._loaded: asyncio.Future | None = None
        self._json_headers = {"Content-Type": JSON_CONTENT_TYPE, HEADER_SERVED_BY: self.served_by}
        # Online features (None: this sidecar joins none): the store's reader, the joiner built for the
        # served model, and the fallback model with its own batcher (None with `defaults`).
        self.joiner: Joiner | None = None
        self._feature_reader: Any = None
        self.fallback: tuple[OnnxModel, Batcher] | None = None
        # System shared memory: the registered regions (every call refused when off), and the extensions.
        self.regions = shm.Regions(config.shared_memory, config.shared_memory_max_regions)
        self.extensions = (*EXTENSIONS, shm.EXTENSION) if config.shared_memory else EXTENSIONS

    # Lifecycle -----------------------------------------------------------------------------
    async def wait_ready(self) -> None:
        """Return once the model is warmed up; raise ``ModelLoadError`` if it could not load."""
        assert self._loaded is not None, "the app has not started"
        await asyncio.shield(self._loaded)

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{self.name}")
        self._loaded = loop.create_future()
        if self.config.features is not None:
            self._feature_reader = _open_reader(self.config.features)
        loading = loop.create_task(self._load(), name=f"load-{self.name}")
        following = None
        if self.config.model_file:
            following = loop.create_task(self._follow_model_file(), name=f"follow-{self.name}")
        try:
            yield
        finally:
            self.ready = self.metrics.ready = False
            if following is not None:
                following.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await following
            if not loading.done():
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loading
            if self.batcher is not None:
                await self.batcher.close()
            if self.fallback is not None:
                await self.fallback[1].close()
            if self._feature_reader is not None:
                with contextlib.suppress(Exception):
                    await self._feature_reader.client.aclose()
            if self.quality_reporter is not None:
                await self.quality_reporter.close()  # the last window, before the shared sink closes
            if self.reporter is not None:
                await self.reporter.close()
            self._executor.shutdown(wait=False, cancel_futures=True)
            self.regions.close()
            if self.tracing is not None:
                self.tracing.shutdown()

    async def on_shutdown(self, app: web.Application) -> None:
        # Health checks see "not ready" while in-flight requests finish.
        self.ready = self.metrics.ready = False

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.config.executor_socket is not None:  # a front of --workers N (sidecar/link.py)
                from sidecar.link import connect

                model, artifact = await connect(self.config.executor_socket, self.reference)  # type: ignore[assignment]
            else:
                model, artifact = await loop.run_in_executor(self._executor, self._load_blocking)
            contract = self._contract_for(model, artifact, self.reference)
            if self.config.features is not None:
                await self._load_fallback(loop)
            joiner = self._joiner_for(model)
            if joiner is not None:  # connect now, so the first request's budget is not spent on it
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._feature_reader.client.ping(), 2.0)
            self._start_serving(model, artifact, joiner)
            self._install_contract(contract)
        except Exception as exc:
            log.error("model %s cannot be served: %s", self.reference, exc)
            if isinstance(exc, ArtifactRefused):
                self.artifact_metrics.refused[exc.reason] += 1
            self.load_error = str(exc)
            self._loaded.set_exception(exc)  # type: ignore[union-attr]
            return
        self.ready = self.metrics.ready = True
        self._loaded.set_result(None)  # type: ignore[union-attr]

    async def _load_fallback(self, loop: asyncio.AbstractEventLoop) -> None:
        """The features' fallback model (same supply-chain checks as the primary), with its own batcher."""
        reference = self.config.features.fallback_model  # type: ignore[union-attr]
        if reference is None:
            return
        name = f"{self.name}-fallback"
        model, _ = await loop.run_in_executor(self._executor, serving.load_model, self.config, reference, name)
        batch = self.config.max_batch_size if model.signature.batchable else 1
        batcher = Batcher(model.run, self._executor, max_batch_size=batch, max_queue=self.config.max_queue)  # type: ignore[arg-type]
        batcher.start()
        self.fallback = (model, batcher)

    def _joiner_for(self, model: OnnxModel) -> Joiner | None:
        """The joiner for ``model``; raises ``ModelLoadError`` when it and the features do not fit."""
        if self.config.features is None:
            return None
        fallback = self.fallback[0].signature if self.fallback is not None else None
        joiner = Joiner(self.config.features, self._feature_reader, model.signature, fallback)
        if self.joiner is not None:  # a swap keeps the counters
            joiner.fetch_seconds = self.joiner.fetch_seconds
        return joiner

    def _start_serving(self, model: OnnxModel, artifact: Artifact | None = None, joiner: Joiner | None = None) -> None:
        """Install a loaded model (first load or swap) in one synchronous step: no request sees half."""
        config = self.config
        batch = config.max_batch_size if model.signature.batchable else 1
        if batch != config.max_batch_size:
            log.warning("model %s has a fixed first axis: batching is off", self.name)
        if config.executor_socket is not None:  # --workers N: the executor's one batcher serves every front
            batcher = model.remote_batcher(self)  # type: ignore[attr-defined]
        else:
            batcher = Batcher(
                model.run,
                self._executor,  # type: ignore[arg-type]
                max_batch_size=batch,
                max_delay_s=config.max_queue_delay_ms / 1000.0,
                max_queue=config.max_queue,
                observer=self.metrics,
                inline_max_s=config.inline_max_us / 1e6,
            )
        batcher.start()
        self.model, self.batcher, self.artifact = model, batcher, artifact
        if joiner is not None:
            if self.joiner is None:
                self.metrics.registry.register(joiner)
            else:  # the registry asks the first joiner: it now reads the new one's signature and counters
                self.metrics.registry.unregister(self.joiner)
                self.metrics.registry.register(joiner)
            self.joiner = joiner
        self.artifact_metrics.served = artifact
        if artifact is not None:
            self._json_headers = {
                **self._json_headers,
                HEADER_MODEL_VERSION: artifact.label,
                HEADER_MODEL_DIGEST: artifact.digest,
            }
        self.metrics.queue_depth = lambda: self.batcher.depth if self.batcher else 0
        self.metrics.provider = model.provider
        sink = self._report_sink
        if sink is None and config.report_to:
            sink = sink_from_url(config.report_to)
        if sink is not None and self.reporter is None:
            self.reporter = Reporter(
                sink,
                variant=config.variant or self.name,
                model=self.name,
                output_names=[s.name for s in model.signature.outputs],
                metrics=self.metrics,
                predictions=config.report_predictions,
            )
            self.reporter.start()

    def _contract_for(self, model: OnnxModel, artifact: Artifact, reference: str) -> data_contract.Contract | None:
        """The model's data contract compiled against its signature; a bad one refuses the model."""
        ref = artifacts.parse_reference(reference)
        contract = data_contract.load(
            model.signature,
            explicit=self.config.contract,
            manifest=artifact.data_contract,
            local_model=data_contract.local_path(ref.url, ref.scheme),
            mode=self.config.contract_mode,
        )
        if contract is not None:
            log.info(
                "model %s checks a data contract (%s): %d input and %d output features",
                self.name,
                contract.mode,
                len(contract.inputs),
                len(contract.outputs),
            )
        return contract

    def _install_contract(self, contract: data_contract.Contract | None) -> None:
        """Put the served model's contract to work (right after ``_start_serving``: no await between)."""
        old = self.quality
        self.quality = None
        if contract is not None:
            self.quality = gate = QualityGate(
                contract, model=self.name, variant=self.served_by, route=self.config.route, metrics=self.metrics
            )
            if contract.enforce and isinstance(self.batcher, Batcher):  # one check per batch, not per request
                self.batcher.screen = gate.screen
                gate.screened = True
            sink = self.reporter.sink if self.reporter is not None else None
            if self.quality_reporter is None and sink is not None and hasattr(sink, "send_quality"):
                self.quality_reporter = QualityReporter(
                    sink,  # type: ignore[arg-type]
                    lambda: self.quality,
                    interval_s=self.config.quality_interval_s,
                    metrics=self.metrics,
                )
                self.quality_reporter.start()
        if old is not None and self.quality_reporter is not None:
            self.quality_reporter.retire(old)  # the old model's window goes out whole

    def _load_blocking(self) -> tuple[OnnxModel, Artifact]:
        if self.config.model_file:
            self.reference = _read_reference(self.config.model_file)
        return serving.load_model(self.config, self.reference, self.name)

    async def swap(self, reference: str) -> bool:
        """Load ``reference`` beside the served model in its own thread, warm it up, switch in one step,
        drain the old batcher (requests already queued on it finish there), then free the old model.
        A reference that fails any check is refused, counted and logged; the old model keeps serving."""
        async with self._swap_lock:
            loop = asyncio.get_running_loop()
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{self.name}")
            try:
                model, artifact = await loop.run_in_executor(
                    executor, serving.load_model, self.config, reference, self.name
                )
                contract = self._contract_for(model, artifact, reference)
                joiner = self._joiner_for(model)
            except Exception as exc:
                executor.shutdown(wait=False)
                if isinstance(exc, ArtifactRefused):
                    self.artifact_metrics.refused[exc.reason] += 1
                self.artifact_metrics.swaps["refused"] += 1
                log.error("model swap to %s refused; still serving %s: %s", reference, self.reference, exc)
                return False
            old_batcher, old_executor = self.batcher, self._executor
            self._executor, self.reference = executor, reference
            self._start_serving(model, artifact, joiner)
            self._install_contract(contract)
            if old_batcher is not None:
                await old_batcher.close()
            if old_executor is not None:
                old_executor.shutdown(wait=True)
            self.artifact_metrics.swaps["swapped"] += 1
            log.info("model %s now serves %s (%s)", self.name, artifact.label, artifact.digest)
            return True

    async def _follow_model_file(self) -> None:
        """Swap when ``--model-file`` names another reference (polled; a half-written file is no change)."""
        await asyncio.shield(self._loaded)  # type: ignore[arg-type]
        async for _ in changes(self.config.model_file, self.config.model_poll_s):  # type: ignore[arg-type]
            try:
                reference = _read_reference(self.config.model_file)  # type: ignore[arg-type]
            except OSError as exc:
                log.error("cannot read --model-file: %s", exc)
                continue
            if reference and reference != self.reference:
                await self.swap(reference)

    # Responses -----------------------------------------------------------------------------
    def _json(self, doc: Any, status: int = 200) -> web.Response:
        return web.Response(body=orjson.dumps(doc), status=status, headers=self._json_headers)

    def _error(self, exc: SidecarError) -> web.Response:
        headers = self._json_headers
        if isinstance(exc, Unavailable):
            headers = {**headers, "Retry-After": str(exc.retry_after_s)}
        elif isinstance(exc, MethodNotAllowed) and exc.allow:
            headers = {**headers, "Allow": exc.allow}
        return web.Response(body=error_body(exc.message, exc.details), status=exc.status, headers=headers)

    def _check_model(self, request: web.Request) -> OnnxModel:
        name = request.match_info["name"]
        if name != self.name:
            raise NotFound(f"unknown model '{name}'; this sidecar serves '{self.name}'")
        version = request.match_info.get("version")
        if version is not None and version != "1":
            raise NotFound(f"model '{name}' has no version '{version}'; versions: 1")
        if self.model is None:
            if self.load_error is not None:
                raise Unavailable(f"model '{name}' cannot be served: {self.load_error}", retry_after_s=30)
            raise Unavailable(f"model '{name}' is loading")
        return self.model

    # Routes --------------------------------------------------------------------------------
    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200, headers={HEADER_SERVED_BY: self.served_by})

    async def server_ready(self, request: web.Request) -> web.Response:
        if not self.ready:
            if self.load_error is not None:
                raise Unavailable(f"model '{self.name}' cannot be served: {self.load_error}", retry_after_s=30)
            raise Unavailable(f"model '{self.name}' is not ready")
        return web.Response(status=200, headers={HEADER_SERVED_BY: self.served_by})

    async def server_metadata(self, request: web.Request) -> web.Response:
        return self._json({"name": SERVER_NAME, "version": __version__, "extensions": list(self.extensions)})

    async def model_metadata(self, request: web.Request) -> web.Response:
        model = self._check_model(request)
        return self._json(self._client_signature(model).metadata(self._parameters(model)))

    async def model_ready(self, request: web.Request) -> web.Response:
        self._check_model(request)
        return await self.server_ready(request)

    async def model_config(self, request: web.Request) -> web.Response:
        """Triton's model-configuration extension, enough for ``tritonclient.get_model_config``."""
        model = self._check_model(request)
        signature = self._client_signature(model)
        batch = self.batcher.max_batch_size if self.batcher and signature.batchable else 0

        def dims(shape: tuple[int, ...]) -> list[int]:
            return list(shape[1:] if batch else shape)

        return self._json(
            {
                "name": self.name,
                "platform": signature.platform,
                "backend": "onnxruntime",
                "max_batch_size": batch,
                "input": [
                    {"name": s.name, "data_type": f"TYPE_{s.datatype}", "dims": dims(s.shape)} for s in signature.inputs
                ],
                "output": [
                    {"name": s.name, "data_type": f"TYPE_{s.datatype}", "dims": dims(s.shape)}
                    for s in signature.outputs
                ],
                "parameters": self._parameters(model),
            }
        )

    def _client_signature(self, model: OnnxModel) -> Signature:
        """What a client sends ``model``: with a join, its input less the joined columns (those are the
        store's, not the client's), so metadata, the model config and the OpenAPI document say what to send."""
        joiner = self.joiner
        return joiner.signature if joiner is not None and model is self.model else model.signature

    def _parameters(self, model: OnnxModel) -> dict[str, Any]:
        batcher = self.batcher
        params: dict[str, Any] = {
            "execution_provider": model.provider,
            "providers": list(model.providers),
            "intra_op_threads": model.intra_op_threads,
            "max_batch_size": batcher.max_batch_size if batcher else 1,
            "max_queue_delay_ms": self.config.max_queue_delay_ms,
        }
        if self.config.variant:
            params["variant"] = self.config.variant
        joiner = self.joiner
        if joiner is not None and model is self.model:  # what the sidecar adds to the client's input
            joined = joiner.signature.inputs[joiner.index]
            params["features"] = {
                "input": joined.name,
                "joined_columns": joiner.width,
                "views": list(joiner.settings.spec.views),
            }
        return params

    async def openapi(self, request: web.Request) -> web.Response:
        """The OpenAPI document of this sidecar, naming its model (and tensors once it has loaded)."""
        if self.model is None:
            return self._json(build_openapi(self.name))
        signature = self._client_signature(self.model)
        return self._json(build_openapi(self.name, signature.inputs, signature.outputs))

    async def metrics_page(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return web.Response(
            body=generate_latest(self.metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST, HEADER_SERVED_BY: self.served_by},
        )

    async def infer(self, request: web.Request) -> web.Response:
        """The hot path: read, decode, queue, await this request's rows, encode."""
        started = time.perf_counter()
        outputs = None
        decoded = None
        timing = None
        joined: Joined | None = None
        try:
            model = self._check_model(request)
            if not self.ready:
                raise Unavailable(f"model '{self.name}' is not ready")
            length = request.content_length
            if length is not None and length > self.config.max_body_bytes:
                raise PayloadTooLarge(f"the body has {length} bytes; the limit is {self.config.max_body_bytes}")
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise PayloadTooLarge(f"the body exceeds the limit of {self.config.max_body_bytes} bytes") from None
            # One snapshot from here to the answer: a live swap between two awaits never mixes models.
            model, batcher, headers = self.model, self.batcher, self._json_headers  # type: ignore[assignment]
            quality = self.quality
            joiner = self.joiner
            signature = model.signature if joiner is None else joiner.signature
            regions = self.tensor_store(request.headers)
            decoded = decode_infer_request(signature, body, request.headers.get(HEADER_LENGTH), regions)
            if self._faults is not None and self._faults.fail_next():
                raise InferenceFailed(f"injected fault (--fault-rate {self._faults.rate})")
            timing = BatchTiming() if self.tracing is not None else None
            inputs = decoded.inputs
            if joiner is not None:
                joined = await joiner.join(request.headers.get(HEADER_ENTITY), inputs)
                headers = {**headers, HEADER_FEATURES: joined.label}
                if joined.inputs is None:  # the fallback model serves the request's own input
                    model, batcher = self.fallback  # type: ignore[misc]
                else:
                    inputs = joined.inputs
            if quality is not None and model is self.model:  # (a features fallback model has no contract)
                sketched = quality.check_inputs(inputs, decoded.rows)  # enforce: raises ContractViolation (422)
            else:
                quality = None
            outputs = await batcher.submit(inputs, decoded.rows, timing)  # type: ignore[union-attr]
            if quality is not None:
                quality.observe_outputs(outputs, decoded.rows, sketched, request.headers.get(HEADER_SEGMENT, ""))
            payload, header_length = encode_infer_response(model.signature, decoded, outputs, regions)
        except SidecarError as exc:
            status = exc.status
            response = self._error(exc)
        except Exception:
            log.exception("infer failed")
            status = 500
            response = web.Response(body=error_body(_INTERNAL), status=500, headers=self._json_headers)
        else:
            status = 200
            if header_length is None:
                response = web.Response(body=payload, headers=headers)
            else:
                response = web.Response(
                    body=payload,
                    headers={**headers, "Content-Type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(header_length)},
                )
        elapsed = time.perf_counter() - started
        self.metrics.on_request(status, elapsed)
        if self.tracing is not None:
            rows = decoded.rows if decoded is not None else None
            record_infer(self.tracing, request.headers, elapsed, status, self.name, self.served_by, rows, timing)
        if self.reporter is not None:
            request_id = request.headers.get(REQUEST_ID) or (decoded.id if decoded is not None else None) or ""
            fallback = (joined.reason or "") if joined is not None else ""
            self.reporter.report(request_id, status, elapsed, outputs if status == 200 else None, fallback=fallback)
        return response

    # System shared memory ------------------------------------------------------------------
    def tensor_store(self, headers: Any) -> shm.TensorStore:
        """Where this request's tensors sent by reference come from: refused when the extension is off
        or the request came through the gateway (the processor set its cluster header)."""
        regions = self.regions
        if not regions.enabled:
            return shm.OFF
        return shm.VIA_GATEWAY if HEADER_CLUSTER in headers else regions

    def shm_guard(self, headers: Any) -> shm.Regions:
        if not self.regions.enabled:
            raise shm.SharedMemoryDisabled(shm.OFF_SENTENCE)
        if HEADER_CLUSTER in headers:
            raise shm.SharedMemoryDisabled(shm.VIA_GATEWAY_SENTENCE)
        return self.regions

    async def shm_status(self, request: web.Request) -> web.Response:
        regions = self.shm_guard(request.headers)
        return self._json(regions.status(request.match_info.get("region", "")))

    async def shm_register(self, request: web.Request) -> web.Response:
        regions = self.shm_guard(request.headers)
        try:
            doc = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            doc = None
        if type(doc) is not dict or type(doc.get("key")) is not str:
            raise shm.RegionInvalid('the body must be a JSON object {"key": "/name", "offset": N, "byte_size": N}')
        regions.register(request.match_info["region"], doc["key"], doc.get("offset", 0), doc.get("byte_size"))
        return web.Response(status=200, headers={HEADER_SERVED_BY: self.served_by})

    async def shm_unregister(self, request: web.Request) -> web.Response:
        regions = self.shm_guard(request.headers)
        regions.unregister(request.match_info.get("region", ""))
        return web.Response(status=200, headers={HEADER_SERVED_BY: self.served_by})

    async def not_found(self, request: web.Request) -> web.Response:
        raise NotFound(f"no route for {request.method} {request.path}")


def _open_reader(settings: JoinSettings) -> Any:
    """The online store's reader, its client created inside the running loop (redis-py connects lazily)."""
    import redis.asyncio as redis

    from sidecar.features import FeastRedisReader

    budget = settings.spec.budget_ms / 1000
    client = redis.Redis.from_url(settings.store, socket_connect_timeout=max(budget, 1.0))
    return FeastRedisReader(settings.spec, client)


def _read_reference(path: str) -> str:
    """The first non-empty, non-comment line of a ``--model-file``."""
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line
    return ""


SIDECAR = web.AppKey("sidecar", Sidecar)


def _json_errors(
    sidecar: Sidecar, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Wrap a cold-path handler so its errors become JSON (the infer handler does this inline)."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except SidecarError as exc:
            return sidecar._error(exc)
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return web.Response(body=error_body(_INTERNAL), status=500, headers=sidecar._json_headers)

    return wrapped


def _method_not_allowed(sidecar: Sidecar, allowed: list[str]) -> Callable[[web.Request], Awaitable[Any]]:
    async def handler(request: web.Request) -> web.Response:
        allow = ", ".join(allowed)
        message = f"{request.method} is not allowed on {request.path}; use {allow}"
        return sidecar._error(MethodNotAllowed(message, allow))

    return handler


def build_app(config: SidecarConfig, *, report_sink: ReportSink | None = None) -> web.Application:
    """The aiohttp application of one sidecar; the model loads when the app starts."""
    sidecar = Sidecar(config, report_sink)
    app = web.Application(client_max_size=config.max_body_bytes)
    app[SIDECAR] = sidecar
    app.cleanup_ctx.append(sidecar.lifecycle)
    app.on_shutdown.append(sidecar.on_shutdown)

    def wrap(h):
        return _json_errors(sidecar, h)

    get = ["GET", "HEAD"]
    # aiohttp tries the resources under one prefix (/v2/models) in order: the hot route goes first.
    routes: list[tuple[str, list[str], Callable]] = [
        ("/v2/models/{name}/infer", ["POST"], sidecar.infer),
        ("/v2/models/{name}/versions/{version}/infer", ["POST"], sidecar.infer),
        ("/v2/health/live", get, wrap(sidecar.live)),
        ("/v2/health/ready", get, wrap(sidecar.server_ready)),
        ("/v2", get, wrap(sidecar.server_metadata)),
        ("/v2/models/{name}", get, wrap(sidecar.model_metadata)),
        ("/v2/models/{name}/versions/{version}", get, wrap(sidecar.model_metadata)),
        ("/v2/models/{name}/ready", get, wrap(sidecar.model_ready)),
        ("/v2/models/{name}/versions/{version}/ready", get, wrap(sidecar.model_ready)),
        ("/v2/models/{name}/config", get, wrap(sidecar.model_config)),
        ("/v2/models/{name}/versions/{version}/config", get, wrap(sidecar.model_config)),
        ("/metrics", get, wrap(sidecar.metrics_page)),
        (OPENAPI_PATH, get, wrap(sidecar.openapi)),
        # System shared memory (sidecar/shm.py): routed always, answered 403 unless --shared-memory.
        ("/v2/systemsharedmemory/status", get, wrap(sidecar.shm_status)),
        ("/v2/systemsharedmemory/region/{region}/status", get, wrap(sidecar.shm_status)),
        ("/v2/systemsharedmemory/region/{region}/register", ["POST"], wrap(sidecar.shm_register)),
        ("/v2/systemsharedmemory/unregister", ["POST"], wrap(sidecar.shm_unregister)),
        ("/v2/systemsharedmemory/region/{region}/unregister", ["POST"], wrap(sidecar.shm_unregister)),
    ]
    for path, methods, handler in routes:
        resource = app.router.add_resource(path)
        for method in methods:
            resource.add_route(method, handler)
        resource.add_route("*", _method_not_allowed(sidecar, [m for m in methods if m != "HEAD"]))
    app.router.add_route("*", "/{tail:.*}", wrap(sidecar.not_found))
    return app


async def serve(
    config: SidecarConfig,
    *,
    stop: asyncio.Event | None = None,
    report_sink: ReportSink | None = None,
    handle_signals: bool = True,
) -> None:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT), then drain and return.

    Raises ``ModelLoadError`` (after closing the port) when the model cannot be served.
    """
    app = build_app(config, report_sink=report_sink)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=config.drain_timeout_s)
    await runner.setup()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals: list[int] = []
    sidecar = app[SIDECAR]
    grpc_server = None
    waiting = asyncio.ensure_future(sidecar.wait_ready())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        fronts = config.executor_socket is not None  # --workers N: N fronts share the port
        site = web.TCPSite(runner, config.host, config.port, backlog=2048, reuse_port=fronts or None)
        await site.start()
        if config.grpc_port is not None:
            from sidecar.grpc_service import start_server

            grpc_server, bound = await start_server(sidecar, config.host, config.grpc_port, config.max_body_bytes)
            sidecar.grpc_port = bound
            log.info("sidecar %s serves OIP v2 gRPC on %s:%d", sidecar.name, config.host, bound)
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, stop.set)
                    signals.append(sig)
        await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if waiting.done():
            waiting.result()  # raises ModelLoadError
            model = sidecar.model
            assert model is not None
            served = sidecar.artifact
            log.info(  # the digest: which artifact every answer until the next swap line comes from
                "sidecar %s (%s) ready on http://%s:%d — model %s (%s), %s, %d intra-op threads, batching %s",
                sidecar.name,
                sidecar.served_by,
                config.host,
                config.port,
                served.label if served is not None else sidecar.reference,
                served.digest if served is not None else "no digest",
                model.provider,
                model.intra_op_threads,
                f"up to {sidecar.batcher.max_batch_size} rows" if sidecar.batcher.max_batch_size > 1 else "off",
            )
        await stopping
    finally:
        for task in (waiting, stopping):
            task.cancel()
        for sig in signals:
            loop.remove_signal_handler(sig)
        if grpc_server is not None:  # calls in flight finish (within the drain timeout) before the model stops
            sidecar.ready = sidecar.metrics.ready = False
            await grpc_server.stop(config.drain_timeout_s)
        await runner.cleanup()
