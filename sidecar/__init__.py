"""cohortgate's model sidecar: ONNX models over the Open Inference Protocol v2, with dynamic batching."""
