# samat's image: `docker run IMAGE run RUN_DIR` runs one run; see docs/containers.md.
# Everything Python comes from requirements.lock (hashes checked), the environment the tests ran
# in: torch from PyPI is the CUDA build, with CUDA's libraries as wheels, so the base needs no
# CUDA, only Python 3.11 (the lock's) or a Debian/Ubuntu whose python3 is 3.11 (CI builds on a
# bare Debian: --build-arg BASE_IMAGE=localhost/debian:bookworm). The host brings the driver.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# The versions the image carries, as in requirements.lock (tests/test_lock.py keeps them equal).
LABEL org.opencontainers.image.title="samat" \
      org.opencontainers.image.description="SAM vs adversarial training robustness experiments" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="0.1.0" \
      io.samat.lock="requirements.lock" \
      io.samat.python="3.11" \
      io.samat.torch="2.14.1" \
      io.samat.torchvision="0.29.1" \
      io.samat.torchattacks="3.5.1"

# Python only where the base lacks it (ensurepip is what Debian's python3 leaves out); the
# packages are not pinned because they come from whichever distribution the base runs.
# hadolint ignore=DL3008
RUN if ! python3 -c 'import ensurepip' 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# A venv of its own, so that pip never writes into a distribution's python (PEP 668) and no
# package of the base takes part. PYTHONNOUSERSITE: Apptainer binds $HOME, whose ~/.local
# packages must not shadow the image's.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONNOUSERSITE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib
RUN python3 -m venv /opt/venv

WORKDIR /opt/samat

# Dependencies first, from the lock alone, so that a code change rebuilds only the small layer
# below. pip_cert: an optional build secret with the CA of a TLS-intercepting proxy.
COPY requirements.lock ./
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    pip install --no-cache-dir --require-hashes -r requirements.lock

COPY . .
# samat on the default PATH too, for runtimes that ignore the image's ENV (e.g. Apptainer running
# this image's root file system as a sandbox)
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build samat.egg-info \
    && ln -s /opt/venv/bin/samat /usr/local/bin/samat \
    && useradd --no-log-init --create-home --uid 10001 --user-group samat

# numeric, so that runtimes need no passwd lookup; `run --user` overrides it
USER 10001:10001
ENTRYPOINT ["samat"]
CMD ["--help"]
