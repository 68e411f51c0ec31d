"""The sidecar's REST contract as an OpenAPI 3.1 document (served at ``/openapi.json``).

Written once as data, in the shape of the KServe/Triton Open Inference Protocol v2 REST schema
(``open_inference_rest.yaml``: the same schema names, so generated clients line up), plus what this
sidecar adds: Triton's model-configuration extension, the binary tensor extension, the Prometheus page
and the JSON error body every failure carries. ``tests/contracts`` checks that every route
``build_app`` registers is here and nothing else, and fuzzes a running sidecar against it.

Built for one served model (``model``): the ``name`` path parameter and the input/output names are
then enumerated, so a client generated from a sidecar's own document can only name what it serves.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

from cohortgate import __version__
from cohortgate.core.contract import HEADER_SERVED_BY
from sidecar.protocol import TensorSpec

OPENAPI_PATH = "/openapi.json"
#: (method, path) of every operation, in the order the sidecar registers them.
OPERATIONS: tuple[tuple[str, str], ...] = (
    ("POST", "/v2/models/{name}/infer"),
    ("POST", "/v2/models/{name}/versions/{version}/infer"),
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    ("GET", "/v2"),
    ("GET", "/v2/models/{name}"),
    ("GET", "/v2/models/{name}/versions/{version}"),
    ("GET", "/v2/models/{name}/ready"),
    ("GET", "/v2/models/{name}/versions/{version}/ready"),
    ("GET", "/v2/models/{name}/config"),
    ("GET", "/v2/models/{name}/versions/{version}/config"),
    ("GET", "/metrics"),
    ("GET", OPENAPI_PATH),
    ("GET", "/v2/systemsharedmemory/status"),
    ("GET", "/v2/systemsharedmemory/region/{region}/status"),
    ("POST", "/v2/systemsharedmemory/region/{region}/register"),
    ("POST", "/v2/systemsharedmemory/unregister"),
    ("POST", "/v2/systemsharedmemory/region/{region}/unregister"),
)

DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64")
HEADER_LENGTH = "Inference-Header-Content-Length"

_REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERROR = _json(_ref("error_response"), "An error: one sentence, never a stack trace.")
_SERVED_BY = {
    HEADER_SERVED_BY: {
        "description": "The variant (or model) that answered.",
        "schema": {"type": "string"},
    }
}

_SCHEMAS: dict[str, Any] = {
    "error_response": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
    },
    "parameters": {
        "type": "object",
        "description": "OIP parameters: free-form; binary_data_size, binary_data_output and binary_data "
        "belong to the binary tensor extension.",
        "additionalProperties": True,
    },
    "metadata_server_response": {
        "type": "object",
        "required": ["name", "version", "extensions"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
    },
    "metadata_tensor": {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string", "enum": list(DATATYPES)},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": -1}},
        },
    },
    "metadata_model_response": {
        "type": "object",
        "required": ["name", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": _ref("metadata_tensor")},
            "outputs": {"type": "array", "items": _ref("metadata_tensor")},
            "parameters": _ref("parameters"),
        },
    },
    "model_config_tensor": {
        "type": "object",
        "required": ["name", "data_type", "dims"],
        "properties": {
            "name": {"type": "string"},
            "data_type": {"type": "string", "enum": [f"TYPE_{d}" for d in DATATYPES]},
            "dims": {"type": "array", "items": {"type": "integer", "minimum": -1}},
        },
    },
    "model_config_response": {
        "type": "object",
        "description": "Triton's model-configuration extension (what tritonclient's get_model_config reads).",
        "required": ["name", "platform", "backend", "max_batch_size", "input", "output"],
        "properties": {
            "name": {"type": "string"},
            "platform": {"type": "string"},
            "backend": {"type": "string"},
            "max_batch_size": {"type": "integer", "minimum": 0},
            "input": {"type": "array", "items": _ref("model_config_tensor")},
            "output": {"type": "array", "items": _ref("model_config_tensor")},
            "parameters": _ref("parameters"),
        },
    },
    "tensor_data": {
        "description": "Row-major values, flat or nested; booleans for BOOL, numbers otherwise.",
        "type": "array",
        "items": {"anyOf": [{"$ref": _REF + "tensor_data"}, {"type": "number"}, {"type": "boolean"}]},
    },
    "request_input": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "datatype": {"type": "string", "enum": list(DATATYPES)},
            "parameters": _ref("parameters"),
            "data": _ref("tensor_data"),
        },
    },
    "request_output": {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string"}, "parameters": _ref("parameters")},
    },
    "inference_request": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": _ref("parameters"),
            "inputs": {"type": "array", "minItems": 1, "items": _ref("request_input")},
            "outputs": {"type": "array", "items": _ref("request_output")},
        },
    },
    "response_output": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "datatype": {"type": "string", "enum": list(DATATYPES)},
            "parameters": _ref("parameters"),
            "data": _ref("tensor_data"),
        },
    },
    "inference_response": {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "parameters": _ref("parameters"),
            "outputs": {"type": "array", "items": _ref("response_output")},
        },
    },
}

_BINARY_NOTE = (
    "Binary tensor extension: with the header Inference-Header-Content-Length: N the first N bytes of "
    "the body are the JSON inference_request, and each input whose parameters.binary_data_size is set "
    "takes that many bytes (little-endian, row-major), in input order, from what follows. The response "
    "comes back the same way (application/octet-stream, with the header) when the request sets "
    "parameters.binary_data_output or an output's parameters.binary_data."
)


def _path_params(versioned: bool, model: str | None) -> list[dict[str, Any]]:
    name: dict[str, Any] = {"type": "string"}
    if model is not None:
        name["enum"] = [model]
    params = [{"name": "name", "in": "path", "required": True, "schema": name}]
    if versioned:
        params.append({"name": "version", "in": "path", "required": True, "schema": {"type": "string", "enum": ["1"]}})
    return params


def _get(op_id: str, summary: str, responses: dict[str, Any], params: list[dict[str, Any]] | None = None) -> dict:
    op: dict[str, Any] = {"operationId": op_id, "summary": summary, "responses": responses}
    if params:
        op["parameters"] = params
    return op


def _with_served_by(response: dict[str, Any]) -> dict[str, Any]:
    return {**response, "headers": _SERVED_BY}


def _shared_memory_paths() -> dict[str, Any]:
    """Triton's system shared-memory extension (sidecar/shm.py): for co-located clients only, off unless
    the sidecar runs with --shared-memory (403 ``shared_memory_disabled``), never through the gateway."""
    region = [{"name": "region", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}]
    status_doc = {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["name", "key", "offset", "byte_size"],
            "properties": {
                "name": {"type": "string"},
                "key": {"type": "string"},
                "offset": {"type": "integer", "minimum": 0},
                "byte_size": {"type": "integer", "minimum": 0},
            },
        },
    }
    off = _json(_ref("error_response"), "Shared memory is off (--shared-memory) or the request came via the gateway.")
    missing = _json(_ref("error_response"), "No region of that name.")
    done = {"200": {"description": "Done (empty body)."}, "403": off}
    register_body = {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["key", "byte_size"],
                    "properties": {
                        "key": {"type": "string", "description": "The object's name in /dev/shm, e.g. /input0."},
                        "offset": {"type": "integer", "minimum": 0},
                        "byte_size": {"type": "integer", "minimum": 1},
                    },
                }
            }
        },
    }
    status = {"200": _json(status_doc, "Every registered region (or the one named)."), "403": off}
    return {
        "/v2/systemsharedmemory/status": {"get": _get("shm_status", "Registered shared-memory regions.", status)},
        "/v2/systemsharedmemory/region/{region}/status": {
            "get": _get("shm_region_status", "One region.", {**status, "404": missing}, region)
        },
        "/v2/systemsharedmemory/region/{region}/register": {
            "post": {
                "operationId": "shm_register",
                "summary": "Register a /dev/shm object as a named region.",
                "parameters": region,
                "requestBody": register_body,
                "responses": {
                    **done,
                    "400": _json(_ref("error_response"), "A bad key, offset or size, or too many regions."),
                    "409": _json(_ref("error_response"), "A region of that name is registered already."),
                },
            }
        },
        "/v2/systemsharedmemory/unregister": {
            "post": {"operationId": "shm_unregister_all", "summary": "Unregister every region.", "responses": done}
        },
        "/v2/systemsharedmemory/region/{region}/unregister": {
            "post": {
                "operationId": "shm_unregister",
                "summary": "Unregister one region.",
                "parameters": region,
                "responses": {**done, "404": missing},
            }
        },
    }


def example_request(inputs: Sequence[TensorSpec]) -> dict[str, Any]:
    """One row of zeros (false for BOOL) per input: a request the model accepts, for the document's example."""
    tensors = []
    for spec in inputs:
        shape = [1 if d == -1 else d for d in spec.shape]
        zero: Any = False if spec.datatype == "BOOL" else 0
        tensors.append(
            {"name": spec.name, "datatype": spec.datatype, "shape": shape, "data": [zero] * math.prod(shape)}
        )
    return {"inputs": tensors}


def build(
    model: str | None = None, inputs: Sequence[TensorSpec] = (), outputs: Sequence[TensorSpec] = ()
) -> dict[str, Any]:
    """The document; with ``model`` (and its signature) it describes that one served model."""
    schemas = copy.deepcopy(_SCHEMAS)
    if inputs:
        schemas["request_input"]["properties"]["name"]["enum"] = [s.name for s in inputs]
    if outputs:
        schemas["request_output"]["properties"]["name"]["enum"] = [s.name for s in outputs]
    unavailable = _json(_ref("error_response"), "Not ready: loading, queue full, or shutting down (Retry-After).")
    not_found = _json(_ref("error_response"), "No such model or version.")
    ready = {
        "200": _with_served_by({"description": "Ready (empty body)."}),
        "503": unavailable,
    }
    infer_responses = {
        "200": {
            "description": "The outputs; binary outputs follow the JSON header (see the extension).",
            "headers": {
                **_SERVED_BY,
                HEADER_LENGTH: {
                    "description": "Length of the JSON header when binary outputs follow.",
                    "schema": {"type": "integer", "minimum": 0},
                },
            },
            "content": {
                "application/json": {"schema": _ref("inference_response")},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        "400": _json(_ref("error_response"), "The body does not fit the model's signature."),
        "404": not_found,
        "413": _json(_ref("error_response"), "The body is larger than --max-body-bytes."),
        "500": _json(_ref("error_response"), "The model failed on this input (onnxruntime's sentence)."),
        "503": unavailable,
    }
    infer_body = {
        "required": True,
        "description": _BINARY_NOTE,
        "content": {
            "application/json": {"schema": _ref("inference_request")},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
    if inputs:
        infer_body["content"]["application/json"]["example"] = example_request(inputs)
    binary_header = {
        "name": HEADER_LENGTH,
        "in": "header",
        "required": False,
        "description": "Binary tensor extension: the length of the JSON header at the start of the body.",
        "schema": {"type": "integer", "minimum": 0},
    }
    paths: dict[str, Any] = {}
    for versioned in (False, True):
        base = "/v2/models/{name}" + ("/versions/{version}" if versioned else "")
        suffix = "_version" if versioned else ""
        params = _path_params(versioned, model)
        paths[base + "/infer"] = {
            "post": {
                "operationId": f"model_infer{suffix}",
                "summary": "Inference (OIP v2), JSON or binary tensors.",
                "parameters": [*params, binary_header],
                "requestBody": infer_body,
                "responses": infer_responses,
            }
        }
        paths[base] = {
            "get": _get(
                f"model_metadata{suffix}",
                "Model metadata: inputs, outputs, platform.",
                {
                    "200": _json(_ref("metadata_model_response"), "The model's metadata."),
                    "404": not_found,
                    "503": unavailable,
                },
                params,
            )
        }
        paths[base + "/ready"] = {
            "get": _get(f"model_ready{suffix}", "Model readiness.", {**ready, "404": not_found}, params)
        }
        paths[base + "/config"] = {
            "get": _get(
                f"model_config{suffix}",
                "Triton's model-configuration extension.",
                {
                    "200": _json(_ref("model_config_response"), "The model's configuration."),
                    "404": not_found,
                    "503": unavailable,
                },
                params,
            )
        }
    paths.update(_shared_memory_paths())
    paths["/v2/health/live"] = {
        "get": _get("server_live", "Liveness: the port is open.", {"200": _with_served_by({"description": "Live."})})
    }
    paths["/v2/health/ready"] = {"get": _get("server_ready", "Readiness: the model is loaded and warm.", ready)}
    paths["/v2"] = {
        "get": _get(
            "server_metadata",
            "Server metadata and extensions.",
            {"200": _json(_ref("metadata_server_response"), "Name, version, extensions.")},
        )
    }
    paths["/metrics"] = {
        "get": _get(
            "metrics",
            "Prometheus exposition: requests, latency, batch sizes, queue depth.",
            {
                "200": {
                    "description": "Prometheus text format.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        )
    }
    paths[OPENAPI_PATH] = {
        "get": _get(
            "openapi",
            "This document.",
            {"200": _json({"type": "object"}, "The OpenAPI 3.1 document of this sidecar.")},
        )
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "cohortgate sidecar (Open Inference Protocol v2, REST)",
            "version": __version__,
            "description": "KServe/Triton OIP v2 REST with the binary tensor and model-configuration "
            'extensions. Every error is JSON {"error": sentence}; unknown routes are 404 and wrong '
            "methods 405 (with Allow), also as JSON. " + _BINARY_NOTE,
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }
