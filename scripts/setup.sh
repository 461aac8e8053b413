#!/usr/bin/env bash
# Install what building and testing cropfleet needs beyond a Rust toolchain, idempotently:
# cmake and nasm (libjpeg-turbo is built from source; without nasm it would lose its SIMD,
# and the `require-simd` feature makes that build fail loudly instead).
# Usage: scripts/setup.sh        (as root, or with sudo available)
set -euo pipefail

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v nasm >/dev/null 2>&1 || need+=(nasm)
if ((${#need[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
echo "setup: cmake $(cmake --version | head -1 | awk '{print $3}'), nasm $(nasm -v | awk '{print $3}')"
