#!/usr/bin/env bash
# What the deployment tests need on a Debian machine (CI, or a developer's): nginx for the
# loopback router test, Docker's engine + docker-compose + debootstrap for the container
# test, and a running dockerd. Idempotent: installs only what is missing, starts dockerd
# only when no engine answers. Never fails the caller: without an engine the container
# test skips and says why (the dockerd log is printed here).
set -uo pipefail

log() { echo "ci-setup: $*"; }

if ! command -v apt-get >/dev/null 2>&1; then
  log "no apt-get: install nginx, docker.io, docker-compose and debootstrap by hand"
  exit 0
fi

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
[ -x /usr/sbin/dockerd ] || need+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${need[@]}" iptables >/dev/null || log "apt-get install failed"
else
  log "nginx, docker.io, docker-compose, debootstrap already installed"
fi
if docker info >/dev/null 2>&1; then
  log "Docker engine already running"
  exit 0
fi
if [ ! -x /usr/sbin/dockerd ]; then
  log "dockerd is not installed; the container test will skip"
  exit 0
fi
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/q8kv-dockerd.log}
log "starting dockerd (log: $DOCKERD_LOG)"
# setsid: dockerd outlives this script and the shell that ran it; its own containerd too.
setsid nohup /usr/sbin/dockerd >"$DOCKERD_LOG" 2>&1 </dev/null &
for _ in $(seq 60); do
  if docker info >/dev/null 2>&1; then
    log "Docker engine up: $(docker info --format '{{.ServerVersion}} {{.Driver}}' 2>/dev/null)"
    exit 0
  fi
  sleep 0.5
done
log "dockerd did not come up in 30 s; the container test will skip. Its log:"
tail -n 30 "$DOCKERD_LOG" | sed 's/^/  dockerd: /'
exit 0
