#!/usr/bin/env bash
# AIPerf (a client no one here wrote) replays a small slice of a Mooncake trace against a live
# `kvgrid serve` on loopback; the check passes when every request succeeds.
#
#   scripts/aiperf_check.sh [N_REQUESTS] [N_WORKERS]
#
# AIPerf lives in its own virtual environment ($AIPERF_VENV, default /tmp/aiperf-venv; created
# with `pip install aiperf` when missing) so its dependencies never touch kvgrid's pins.
# The slice is the first N (at most 32) requests of the Mooncake conversation trace (a copy of
# its head is in tests/data, so the check needs nothing outside the repo), scaled to this machine: the
# hash_ids (shared-prefix structure) are kept, each id becomes a 64-token block instead of a
# 512-token one (AIPerf's --isl-block-size), and outputs are capped at 16 tokens.
set -euo pipefail

N=${1:-8}
WORKERS=${2:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TRACE=${KVGRID_TRACE:-$ROOT/tests/data/mooncake_conversation_head32.jsonl}
VENV=${AIPERF_VENV:-/tmp/aiperf-venv}
PY=${PYTHON:-python}
WORK=$(mktemp -d /tmp/kvgrid-aiperf.XXXXXX)
PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

if [ ! -x "$VENV/bin/aiperf" ]; then
  echo "installing aiperf into $VENV"
  if ! { $PY -m venv "$VENV" && "$VENV/bin/pip" install -q aiperf; }; then
    echo "WARNING: could not install aiperf from PyPI: the AIPerf check is SKIPPED" >&2
    exit 0
  fi
fi

MODEL_DIR=$($PY -c 'from kvgrid.models.default import ensure_default_model; print(ensure_default_model(progress=False))')
MODEL_NAME=$(basename "$MODEL_DIR")

$PY - "$TRACE" "$N" > "$WORK/slice.jsonl" <<'EOF'
import json, sys
path, n = sys.argv[1], int(sys.argv[2])
with open(path) as f:
    for line, _ in zip(f, range(n)):
        r = json.loads(line)
        r["input_length"] = 64 * len(r["hash_ids"])
        r["output_length"] = max(1, min(16, r["output_length"]))
        print(json.dumps(r))
EOF

KVGRID_STORE_DIR="$WORK/store" $PY -m kvgrid.cli serve --workers "$WORKERS" --port "$PORT" --max-model-len 4096 \
  > "$WORK/serve.log" 2>&1 &
SERVER=$!
cleanup() { kill -INT "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; }
trap cleanup EXIT

$PY - "$PORT" <<'EOF' || { cat "$WORK/serve.log"; exit 1; }
import sys, time, httpx
url = f"http://127.0.0.1:{sys.argv[1]}/health"
for _ in range(240):
    try:
        if httpx.get(url, timeout=2).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(0.5)
sys.exit(1)
EOF

# the tokenizer is the model's own directory (AIPerf's HF_HUB_OFFLINE path cannot load a
# local directory, so leave it unset); telemetry and UI off
"$VENV/bin/aiperf" profile \
  --model "$MODEL_NAME" --tokenizer "$MODEL_DIR" \
  --url "http://127.0.0.1:$PORT" --endpoint-type chat --streaming \
  --input-file "$WORK/slice.jsonl" --custom-dataset-type mooncake_trace --fixed-schedule \
  --isl-block-size 64 --request-timeout-seconds 300 \
  --output-artifact-dir "$WORK/artifacts" --ui-type none --no-gpu-telemetry \
  > "$WORK/aiperf.log" 2>&1 || { tail -40 "$WORK/aiperf.log"; exit 1; }

$PY - "$WORK/artifacts" "$N" <<'EOF'
import json, pathlib, sys
art, n = pathlib.Path(sys.argv[1]), int(sys.argv[2])
summary = json.loads(next(art.rglob("profile_export_aiperf.json")).read_text())
records = [json.loads(l) for p in art.rglob("profile_export.jsonl") for l in p.read_text().splitlines() if l]
errors = [r for r in records if r.get("error")]
ok = len(records) == n and not errors
ttft = summary.get("time_to_first_token", {})
print(f"aiperf: {len(records)} requests, {len(errors)} errors, "
      f"TTFT p50 {ttft.get('p50', float('nan')):.1f} {ttft.get('unit', '')}")
if errors:
    print(json.dumps(errors[:3], indent=1))
sys.exit(0 if ok else 1)
EOF
echo "aiperf check passed (artifacts in $WORK/artifacts)"
