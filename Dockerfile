# hvsock-emulator image: the host service (hvsock-host), the guest library and the hvsock CLI.
#
# Two stages: `build` builds the project's wheel (compiling the Cython ring and generating the
# gRPC modules) and installs it with its dependencies into a virtual environment at /opt/hvsock;
# the runtime stage copies only that environment: no compiler, headers or build tools. Both
# stages must run the same Python at the same path (the environment's interpreter is a link to
# it), which is why the two base images are a pair: python:X and python:X-slim, or two local
# images built from one Debian release (docker/base-images.sh, for machines without a registry).
#
# Offline builds: put wheels for every dependency (and the build requirements setuptools, cython,
# grpcio-tools) in docker/wheels/ (docker/download-wheels.sh does it); pip then installs from
# that folder only. With the folder empty, pip uses the package index.
ARG BUILD_IMAGE=python:3.12
ARG RUNTIME_IMAGE=python:3.12-slim

FROM ${BUILD_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
COPY docker/wheels/ /wheels/
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protos/ protos/
COPY ring/ ring/
COPY hvsock_common/ hvsock_common/
COPY host_service/ host_service/
COPY guest_client/ guest_client/
COPY hvsock_tools/ hvsock_tools/
RUN set -eu; \
    if ls /wheels/*.whl >/dev/null 2>&1; then \
        export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels; echo "installing from docker/wheels"; \
    fi; \
    python3 -m venv /opt/hvsock; \
    /opt/hvsock/bin/pip wheel --no-deps --wheel-dir /dist /src; \
    /opt/hvsock/bin/pip install /dist/hvsock_emulator-*.whl; \
    cd / && /opt/hvsock/bin/python -c "import ring._ring, hvsock.v1.hvsock_pb2_grpc, hvsock_common.workers, guest_client, hvsock_tools.cli; from hvsock_tools.run import preload_library; preload_library()"

FROM ${RUNTIME_IMAGE}
# socat: the unmodified vsock program the testbed runs with `hvsock run` (vm-vsock). The local
# base images have it; a registry image (python:X-slim) gets it from Debian.
RUN command -v socat >/dev/null || { apt-get update && apt-get install -y --no-install-recommends socat && rm -rf /var/lib/apt/lists/*; }
# One unprivileged user with a fixed uid in every container: the host's shared-memory socket
# (in the shm-socket volume) is the host user's, so the VMs that use it run as the same uid.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin hvsock \
    && mkdir -p /var/lib/hvsock /run/hvsock /run/hvsock-shm \
    && chown hvsock:hvsock /var/lib/hvsock /run/hvsock /run/hvsock-shm
COPY --from=build /opt/hvsock /opt/hvsock
ENV PATH=/opt/hvsock/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER hvsock
WORKDIR /home/hvsock
EXPOSE 50051 9100
CMD ["hvsock-host", "--listen", "0.0.0.0:50051"]
