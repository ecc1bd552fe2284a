#!/usr/bin/env bash
# End-to-end check of the Docker deployment on a real engine (docker compose v2, curl, python3 on the host):
#
#   build → first `up` (the init job trains the demo bundle inside the container: minutes) → api healthy →
#   every sample through /identify (enrolled → its identity, unknown → null), /verify and /embed →
#   `down` and a second `up`, which must reuse the volumes (seconds) → `down -v`.
#
#   scripts/docker-smoke.sh        SMOKE_PORT (default 18000), SMOKE_PROJECT (default centerid-smoke)
#
# A torch wheel in pip's find-links folder (`pip config get global.find-links`) is hard-linked into wheels/,
# which the Dockerfile bind-mounts, so the build needs no torch download.
set -euo pipefail
cd "$(dirname "$0")/.."

export CENTERID_PORT=${SMOKE_PORT:-18000}
PROJECT=${SMOKE_PROJECT:-centerid-smoke}
BASE="http://127.0.0.1:$CENTERID_PORT"
WORK=$(mktemp -d)
compose() { docker compose -p "$PROJECT" "$@"; }
say() { printf '[smoke] %s\n' "$*"; }
fail() { say "FAILED: $*"; exit 1; }

cleanup() {
  status=$?
  if [ $status -ne 0 ]; then compose logs --no-color --tail 60 >&2 || true; fi
  compose down -v --remove-orphans >/dev/null 2>&1 || true
  rm -rf "$WORK"
  exit $status
}
trap cleanup EXIT

links=$(pip config get global.find-links 2>/dev/null || true)
for wheel in "$links"/torch-2.13.0*.whl; do
  [ -f "$wheel" ] || continue
  [ -f "wheels/$(basename "$wheel")" ] || cp -l "$wheel" wheels/ 2>/dev/null || cp "$wheel" wheels/
  export TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://pypi.org/simple}  # torch is local: no PyTorch index needed
  say "local wheel: wheels/$(basename "$wheel")"
done

started=$(date +%s)
compose build
build_s=$(( $(date +%s) - started ))
say "built in ${build_s} s; image: $(docker image ls centerid:latest --format '{{.Repository}}:{{.Tag}} {{.Size}}')"

wait_healthy() {  # $1: timeout in seconds
  local deadline=$(( $(date +%s) + $1 )) id status
  id=$(compose ps -q api)
  [ -n "$id" ] || fail "the api container was not created"
  while :; do
    status=$(docker inspect -f '{{.State.Health.Status}}' "$id")
    [ "$status" = healthy ] && return 0
    [ "$(date +%s)" -lt "$deadline" ] || fail "api not healthy after $1 s (status: $status)"
    sleep 2
  done
}

started=$(date +%s)
# as the README says: --wait returns once init has completed (api depends on it) and api is healthy
compose up -d --wait --wait-timeout 1800
wait_healthy 5
first_s=$(( $(date +%s) - started ))
say "first up (init trained the demo) healthy after ${first_s} s"
init_logs() { compose logs --no-color init; }  # captured first: `| grep -q` would SIGPIPE it under pipefail
grep -q "curl -s -F image=@" <<<"$(init_logs)" || fail "init printed no curl lines"

compose cp api:/samples "$WORK/samples"
ls "$WORK"/samples/*.png >/dev/null || fail "no sample images in the samples volume"

post() { curl -sS --fail-with-body "$@"; }
checked=0
for sample in "$WORK"/samples/*.png; do
  name=$(basename "$sample" .png)
  expected=${name%_*}
  [ "$expected" = unknown ] && expected=null
  answer=$(post -F "image=@$sample" "$BASE/identify")
  got=$(printf '%s' "$answer" | python3 -c 'import json, sys; print(json.load(sys.stdin)["identity"] or "null")')
  [ "$got" = "$expected" ] || fail "/identify $name.png answered $got, expected $expected: $answer"
  checked=$((checked + 1))
done
say "/identify: $checked samples answered as named (enrolled → identity, unknown → null)"

first=$(find "$WORK/samples" -name 's*_1.png' | sort | head -n 1)
twin=${first%_1.png}_2.png
label=$(basename "${first%_1.png}")
post -F "image_a=@$first" -F "image_b=@$twin" "$BASE/verify" | python3 -c '
import json, sys; r = json.load(sys.stdin); assert -1 <= r["similarity"] <= 1 and r["label"] is None, r'
post -F "image=@$first" -F "label=$label" "$BASE/verify" | python3 -c '
import json, sys; r = json.load(sys.stdin); assert r["label"] == sys.argv[1] and r["match"] is True, r' "$label"
post -F "files=@$first" -F "files=@$twin" "$BASE/embed" | python3 -c '
import json, math, sys; r = json.load(sys.stdin); e = r["embeddings"]
assert len(e) == 2 and all(len(v) == r["dim"] and abs(math.hypot(*v) - 1) < 1e-4 for v in e), r
print("[smoke] /embed: 2 x %d-D unit vectors from %s" % (r["dim"], r["model"]))'
say "/verify: pair and label answered"

compose down
started=$(date +%s)
compose up -d --wait --wait-timeout 300
wait_healthy 5
second_s=$(( $(date +%s) - started ))
grep -q "reusing the bundle" <<<"$(init_logs)" || fail "the second init did not reuse the bundle"
say "second up (volumes reused) healthy after ${second_s} s"
say "PASSED: build ${build_s} s, first up ${first_s} s, second up ${second_s} s"
