#!/usr/bin/env bash
# Builds the container images samat's container tests use, on a CI machine that reaches no image
# registry (see docs/containers.md): a Debian bookworm base made with debootstrap, the image
# localhost/samat:ci built from the Dockerfile by podman, and Apptainer in a Debian sid root file
# system that .ci/container-apptainer runs through bubblewrap (apptainer is not installable on
# bookworm). Run as root; idempotent (steps whose result exists are skipped); prints step timings.
# Settings: SAMAT_CI_DIR (state directory, default /var/lib/samat-ci), SAMAT_CI_IMAGE (default
# localhost/samat:ci), SAMAT_CI_APPTAINER=0 (no Apptainer), SAMAT_CI_APPTAINER_BUILD=1 (also
# prepare the slow test that builds Apptainer.def).
# Writes $SAMAT_CI_DIR/env, to be sourced before the tests (CONTAINERS_CONF and friends).
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "containers.sh: run as root (it installs packages)" >&2; exit 2; }
REPO=$(cd "$(dirname "$0")/.." && pwd)
STATE=${SAMAT_CI_DIR:-/var/lib/samat-ci}
IMAGE=${SAMAT_CI_IMAGE:-localhost/samat:ci}
BASE=localhost/debian:bookworm
mkdir -p "$STATE"
# world-writable like /tmp: Apptainer runs as nobody and writes its images and run dirs here
install -d -m 1777 "$STATE/work"

T0=$SECONDS
step() { printf '[containers %4ss] %s\n' "$((SECONDS - T0))" "$*"; }

# --- packages --------------------------------------------------------------------------------
missing=()
for pkg in podman buildah debootstrap bubblewrap runc uidmap catatonit; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
step "packages ready ($(podman --version))"

# crun fails here on hybrid cgroups and larger ulimits are refused: podman reads these settings from
# the file CONTAINERS_CONF names, so nothing about this machine goes into samat's code
cat > "$STATE/containers.conf" <<'CONF'
[containers]
netns = "host"
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF=$STATE/containers.conf

# The Debian mirror the host itself uses (deb822 .sources or one-line .list entries).
mirror() {
  awk -v suite="$1" '
    /^URIs:/ { uri = $2 }
    /^Suites:/ && uri ~ /\/debian\/?$/ { for (i = 2; i <= NF; i++) if ($i == suite && !found) { found = uri } }
    /^deb / && $2 ~ /\/debian\/?$/ && $3 == suite && !found { found = $2 }
    END { print found }' $(ls /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
                                /etc/apt/sources.list.d/*.list 2>/dev/null) /dev/null
}
MIRROR=$(mirror bookworm)
MIRROR=${MIRROR:-http://deb.debian.org/debian}

# --- base image --------------------------------------------------------------------------------
if ! podman image exists "$BASE"; then
  step "debootstrap bookworm from $MIRROR"
  rm -rf "$STATE/bookworm"
  debootstrap --variant=minbase bookworm "$STATE/bookworm" "$MIRROR" >"$STATE/debootstrap-bookworm.log" 2>&1 \
    || { tail -n 20 "$STATE/debootstrap-bookworm.log" >&2; exit 1; }
  rm -rf "$STATE/bookworm/var/cache/apt/archives/"*.deb "$STATE/bookworm/var/lib/apt/lists/"*
  tar -C "$STATE/bookworm" -c . | podman import --quiet - "$BASE" >/dev/null
  rm -rf "$STATE/bookworm"
fi
step "base image $BASE ready"

# --- pip sources for the build ------------------------------------------------------------------
# The image installs requirements.lock (hashes checked). This machine keeps torch and its CUDA
# wheels on disk (/opt/pypi, /opt/pypi-more): installing from there beats ~4 GB from PyPI, so the
# build uses no index at all: local files plus a wheelhouse of the locked wheels the disk lacks,
# downloaded (hash-checked) whenever the lock changes.
build_mounts=()
if [ -d /opt/pypi/files ] && [ -d /opt/pypi-more/files ]; then
  mkdir -p "$STATE/wheelhouse"
  lock_sum=$(sha256sum "$REPO/requirements.lock" | cut -d' ' -f1)
  if [ "$(cat "$STATE/wheelhouse/.complete" 2>/dev/null)" != "$lock_sum" ]; then
    step "downloading the locked wheels the local files lack"
    python3 "$REPO/.ci/wheelhouse.py" "$REPO/requirements.lock" "$STATE/wheelhouse" /opt/pypi/files \
      /opt/pypi-more/files > "$STATE/wheelhouse.txt"
    if [ -s "$STATE/wheelhouse.txt" ]; then
      PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS='' python3 -m pip download -q --no-deps \
        --only-binary=:all: --require-hashes -d "$STATE/wheelhouse" -r "$STATE/wheelhouse.txt"
    fi
    echo "$lock_sum" > "$STATE/wheelhouse/.complete"
  fi
  cat > "$STATE/pip.conf" <<'CONF'
[global]
no-index = true
find-links = /opt/samat-ci/wheelhouse /opt/pypi/files /opt/pypi-more/files
CONF
  build_mounts=(-v "$STATE/wheelhouse:/opt/samat-ci/wheelhouse:ro" -v /opt/pypi:/opt/pypi:ro
                -v /opt/pypi-more:/opt/pypi-more:ro -v "$STATE/pip.conf:/etc/pip.conf:ro")
fi
secret=()
[ -s /etc/ssl/certs/ca-certificates.crt ] && secret=(--secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt)

# --- the samat image ---------------------------------------------------------------------------
ROOTFS=$STATE/work/samat-ci.rootfs
# The image's root file system, shown read-only to Apptainer as a sandbox (below); let go of the
# old one first, so that prune can remove a replaced image.
release_rootfs() {
  if mountpoint -q "$ROOTFS"; then umount "$ROOTFS"; fi
  if [ -s "$STATE/rootfs.id" ]; then podman image unmount "$(cat "$STATE/rootfs.id")" >/dev/null 2>&1 || true; fi
  rm -f "$STATE/rootfs.id"
}
release_rootfs
# Layer caching keeps this fast when only samat's code changed (the dependency layer is reused).
step "building $IMAGE (log: $STATE/build.log)"
if ! podman build --isolation=chroot --network=host --build-arg BASE_IMAGE="$BASE" \
     "${secret[@]}" "${build_mounts[@]}" -t "$IMAGE" -f "$REPO/Dockerfile" "$REPO" >"$STATE/build.log" 2>&1; then
  tail -n 30 "$STATE/build.log" >&2
  exit 1
fi
# a failed prune (an image still used by a stopped build, say) costs only disk
podman image prune -f >/dev/null 2>&1 || step "podman image prune failed; old images stay"
ID=$(podman image inspect --format '{{.Id}}' "$IMAGE")
step "image $IMAGE ready: $(podman image inspect --format '{{.Size}}' "$IMAGE" | numfmt --to=si)B"

# --- Apptainer ---------------------------------------------------------------------------------
# By default Apptainer runs the image's root file system as a sandbox (no copy of its 6 GB).
# Building Apptainer.def itself needs the image as a docker-archive and a full unpack (~6 min
# here): opt in with SAMAT_CI_APPTAINER_BUILD=1; test_container.py then builds it.
apptainer_ready=0
if [ "${SAMAT_CI_APPTAINER:-1}" != 0 ]; then
  SID=$STATE/sid
  if [ ! -x "$SID/usr/bin/apptainer" ]; then
    step "debootstrap sid and install apptainer into it"
    rm -rf "$SID"
    debootstrap --variant=minbase --include=ca-certificates sid "$SID" "$MIRROR" \
      >"$STATE/debootstrap-sid.log" 2>&1 || { tail -n 20 "$STATE/debootstrap-sid.log" >&2; exit 1; }
    cp /etc/resolv.conf "$SID/etc/resolv.conf"
    chroot "$SID" sh -c 'apt-get -qq -o Acquire::Check-Valid-Until=false update &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq apptainer >/dev/null && apt-get clean' \
      >>"$STATE/debootstrap-sid.log" 2>&1 || { tail -n 20 "$STATE/debootstrap-sid.log" >&2; exit 1; }
  fi
  mkdir -p "$SID$STATE/work"  # the mount point of the work directory (.ci/container-apptainer)
  mkdir -p "$ROOTFS"
  mount --bind "$(podman image mount "$IMAGE")" "$ROOTFS"
  mount -o remount,bind,ro "$ROOTFS"
  echo "$ID" > "$STATE/rootfs.id"
  if [ "${SAMAT_CI_APPTAINER_BUILD:-0}" = 1 ] && [ "$(cat "$STATE/work/samat-ci.id" 2>/dev/null)" != "$ID" ]; then
    step "saving $IMAGE as a docker-archive for Apptainer.def"
    rm -f "$STATE/work/samat-ci.tar"
    podman save --quiet --format docker-archive -o "$STATE/work/samat-ci.tar" "$IMAGE"
    chmod 644 "$STATE/work/samat-ci.tar"
    echo "$ID" > "$STATE/work/samat-ci.id"
  fi
  apptainer_ready=1
  step "$("$REPO/.ci/container-apptainer" --version) ready; the image as a sandbox: $ROOTFS"
fi

cat > "$STATE/env" <<ENV
export CONTAINERS_CONF=$STATE/containers.conf
export SAMAT_CI_DIR=$STATE
export SAMAT_CI_IMAGE=$IMAGE
export SAMAT_CI_APPTAINER=$apptainer_ready
export SAMAT_CI_APPTAINER_BUILD=${SAMAT_CI_APPTAINER_BUILD:-0}
ENV
step "done; before the tests: source $STATE/env"
