#!/usr/bin/env bash
# Wheels for `kvgrid serve` and `kvgrid serve --ray` on a GPU machine with no package index:
# CPython 3.12, manylinux x86_64, the packages such a machine's image lacks (it has torch,
# numpy, httpx, msgpack, protobuf, click, filelock, pyyaml, requests, prometheus-client).
# Ray's wheel (79 MB) is carried slimmed as an archive (about 20 MB): the Java jars, the
# dashboard's web client and the libraries kvgrid does not use (data, train, tune, rllib,
# serve, llm) are left out.
#
#   bash scripts/ray_wheels.sh [DIR]        # default .whl
# There (DIR next to the repository):
#   pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl
#   tar -xJf DIR/ray-*-slim.tar.xz -C /tmp/site
#   export PYTHONPATH=$PWD:/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PYTHON:-python3}
PYVER=${PYVER:-3.12}  # the target machine's Python
RAY=2.60.0
WHEELS=(
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.13.4 pydantic-core==2.46.4
  annotated-types==0.7.0 typing-inspection==0.4.2 uvicorn==0.55.0
  pyzmq==27.3.0 zstandard==0.25.0 cryptography==48.0.0 cffi==2.0.0 pycparser==3.0
  redis==8.1.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
  rpds-py==0.30.0 opentelemetry-api==1.45.2 annotated-doc==0.0.7
)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux_2_34_x86_64 --platform manylinux1_x86_64)
mkdir -p "$DIR"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${PLATFORMS[@]}" -d "$DIR" "${WHEELS[@]}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${PLATFORMS[@]}" -d "$tmp" "ray==$RAY"
mkdir "$tmp/x"
"$PY" -m zipfile -e "$tmp"/ray-"$RAY"-*.whl "$tmp/x"
rm -rf "$tmp/x/ray/jars" "$tmp/x/ray/dashboard/client" "$tmp/x/ray/data" "$tmp/x/ray/train" \
       "$tmp/x/ray/tune" "$tmp/x/ray/rllib" "$tmp/x/ray/serve" "$tmp/x/ray/llm"
chmod +x "$tmp"/x/ray/core/src/ray/gcs/gcs_server "$tmp"/x/ray/core/src/ray/raylet/raylet
tar -C "$tmp/x" -cf - . | xz -9 -T0 > "$DIR/ray-$RAY-cp${PYVER/./}-slim.tar.xz"
du -ch "$DIR"/* | tail -1
