# orsgen GPU worker image for Dataflow (Runner v2): SAM2 and in-process VLMs on
# CUDA torch, plus vLLM in its own venv for caption.backend.backend: managed.
#
#   python -m pip wheel --no-deps -w dist .          # from the repository root (dist/ is the build context)
#   docker build -f containers/gpu.Dockerfile -t REGION-docker.pkg.dev/PROJECT/orsgen/orsgen-gpu:0.1.0 dist
#   docker push REGION-docker.pkg.dev/PROJECT/orsgen/orsgen-gpu:0.1.0
#
# The NVIDIA driver is not in the image: Dataflow installs it on the VM with
#   --dataflow_service_options="worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"
# and mounts it into the container. CUDA user-space libraries come with the
# torch wheels (nvidia-* packages), so the SDK image is a sufficient base.
ARG BEAM_VERSION=2.77.0
FROM apache/beam_python3.11_sdk:${BEAM_VERSION}
ARG BEAM_VERSION
# CUDA build of torch (orsgen pins torch==2.14.1 / torchvision==0.29.1); the
# index must carry that pair for the CUDA version the driver supports (L4: CUDA 12.x).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# vLLM for the managed backend, in its own venv: vLLM pins its own torch and
# cannot share an environment with Beam. Pin the version you validated.
ARG VLLM_VERSION=0.11.0

COPY orsgen-*.whl /tmp/wheels/
RUN set -eux; \
    pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1; \
    whl="$(ls /tmp/wheels/orsgen-*.whl)"; \
    pip install --no-cache-dir "${whl}[sam2,vlm,gcp]" "apache-beam[gcp]==${BEAM_VERSION}"; \
    pip check; \
    python -c "import orsgen, gcsfs, torch, transformers, aiohttp"; \
    rm -rf /tmp/wheels

RUN set -eux; \
    python -m venv /opt/vllm-venv; \
    /opt/vllm-venv/bin/pip install --no-cache-dir "vllm==${VLLM_VERSION}"; \
    /opt/vllm-venv/bin/vllm --help > /dev/null

# Model weights: mount or bake them in (e.g. COPY a local snapshot to /models)
# and point caption.backend.model / verify_sam2.model at the path; workers
# usually cannot download from the Hub.
ENV HF_HUB_OFFLINE=1 \
    RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT=1
ENTRYPOINT ["/opt/apache/beam/boot"]
