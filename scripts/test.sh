#!/usr/bin/env bash
# The README's test command. Installs what the integration tests need (OpenSSH's sshd for the
# SFTP tests, a Prometheus Pushgateway for the metrics push), then runs the format check, clippy with warnings as errors, and every test.
# CI runs exactly this on a fresh clone (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
    echo "test.sh: need root to install packages: $*" >&2; return 1; fi
}

missing=()
if ! command -v sshd >/dev/null 2>&1 && [ ! -x /usr/sbin/sshd ]; then missing+=(openssh-server); fi
if ! command -v ssh-keygen >/dev/null 2>&1; then missing+=(openssh-client); fi
if ! command -v prometheus-pushgateway >/dev/null 2>&1; then missing+=(prometheus-pushgateway); fi
if ! command -v shellcheck >/dev/null 2>&1; then missing+=(shellcheck); fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: installing ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# sshd refuses to start without its privilege-separation directory.
as_root mkdir -p /run/sshd 2>/dev/null || true

export CARGO_TERM_COLOR=never
# As root (CI), the tests that log in as a local password user must run, not skip.
if [ "$(id -u)" = 0 ]; then export BQ2SFTP_REQUIRE_ROOT_TESTS=1; fi
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked
