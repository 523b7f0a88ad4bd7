# orsgen CPU worker image for Dataflow (Runner v2), on the Beam 2.77 Python SDK image.
#
#   python -m pip wheel --no-deps -w dist .          # from the repository root (dist/ is the build context)
#   docker build -f containers/cpu.Dockerfile -t REGION-docker.pkg.dev/PROJECT/orsgen/orsgen-cpu:0.1.0 dist
#   docker push REGION-docker.pkg.dev/PROJECT/orsgen/orsgen-cpu:0.1.0
#
# Then run with --sdk_container_image=<that tag> (README, "Running on Dataflow").
# The image must match the launcher's apache-beam version (boot checks it).
ARG BEAM_VERSION=2.77.0
FROM apache/beam_python3.11_sdk:${BEAM_VERSION}
ARG BEAM_VERSION

COPY orsgen-*.whl /tmp/wheels/
# orsgen with the gcp extra (gcsfs); apache-beam pinned to the image's own
# version so that pip never replaces the SDK the boot program checks.
RUN set -eux; \
    whl="$(ls /tmp/wheels/orsgen-*.whl)"; \
    pip install --no-cache-dir "${whl}[gcp]" "apache-beam[gcp]==${BEAM_VERSION}"; \
    pip check; \
    python -c "import orsgen, gcsfs, pycocotools, cv2"; \
    rm -rf /tmp/wheels

# Everything is installed in the image: the SDK harness needs no per-worker venv.
ENV RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT=1
ENTRYPOINT ["/opt/apache/beam/boot"]
