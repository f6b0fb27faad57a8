# samat's image: `docker run IMAGE run RUN_DIR` runs one run; see docs/containers.md.
# The default base brings CUDA, python and torch; any Debian/Ubuntu base works too
# (CI builds on a bare Debian: --build-arg BASE_IMAGE=localhost/debian:bookworm).
ARG BASE_IMAGE=docker.io/pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# Python only where the base lacks it (ensurepip is what Debian's python3 leaves out); the
# packages are not pinned because they come from whichever distribution the base runs.
# hadolint ignore=DL3008
RUN if ! python3 -c 'import ensurepip' 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# A venv that still sees the base's packages, so the CUDA base's torch is used as it is, and
# pip never writes into a distribution's python (PEP 668). PYTHONNOUSERSITE: Apptainer binds
# $HOME, whose ~/.local packages must not shadow the image's.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONNOUSERSITE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib
RUN python3 -m venv --system-site-packages /opt/venv

WORKDIR /opt/samat

# Dependencies first, from the project metadata alone (not even the README), so that a change
# elsewhere rebuilds only the small layer below. pip_cert: an optional build secret with the CA
# of a TLS-intercepting proxy.
COPY pyproject.toml ./
COPY samat/__init__.py samat/
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    pip install --no-cache-dir .

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
