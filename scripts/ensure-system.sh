#!/usr/bin/env bash
# Installs the Debian packages edgevisor and its tests use, when they are missing.
# As root: apt-get installs them. Otherwise: says which are missing and what is lost.
set -euo pipefail

PKGS=(
  python3 python3-venv python3-dev gcc pkg-config make
  iproute2 util-linux e2fsprogs procps kmod
  nftables libnftables1 conntrack iputils-arping iputils-ping
  fuse3 libfuse3-dev
  nbdkit libnbd-bin qemu-utils
  mosquitto mosquitto-clients
  postgresql
  wrk
)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "warning: missing system packages: ${missing[*]}" >&2
  echo "warning: without root they cannot be installed; isolation, NBD, MQTT and PostgreSQL tests will be skipped or fail" >&2
  exit 0
fi

echo "installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Package installs may start services; the tests start their own throwaway instances.
for svc in mosquitto postgresql; do
  (command -v systemctl >/dev/null && systemctl stop "$svc" 2>/dev/null) || true
  (command -v service >/dev/null && service "$svc" stop >/dev/null 2>&1) || true
done
