"""Serving the demo: the hardened server in this process, and curl lines on the samples once it is ready.

Its own module because it is the only part of the demo that runs the service and talks HTTP to it.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.demo_folders import DemoError


def curl_lines(base_url: str, folder: str, samples: dict[str, dict[str, Any]], auth: bool) -> list[str]:
    """Ready-to-paste requests on the samples: identify a known and an unknown face, verify, embed."""
    known = sorted(name for name, sample in samples.items() if sample["identity"] is not None)
    strangers = sorted(name for name, sample in samples.items() if sample["identity"] is None)
    curl = "curl -s" + (' -H "X-API-Key: ${CENTERID_API_KEYS%%,*}"' if auth else "")
    lines = []
    if known:
        first, label = known[0], samples[known[0]]["identity"]
        lines.append(f"{curl} -F image=@{folder}/{first} {base_url}/identify    # → {label}")
        lines.append(f"{curl} -F image=@{folder}/{first} -F label={label} {base_url}/verify")
        twin = next((name for name in known[1:] if samples[name]["identity"] == label), None)
        if twin:
            lines.append(f"{curl} -F image_a=@{folder}/{first} -F image_b=@{folder}/{twin} {base_url}/verify")
        lines.append(f"{curl} -F files=@{folder}/{first} {base_url}/embed")
    if strangers:
        lines.append(f"{curl} -F image=@{folder}/{strangers[0]} {base_url}/identify    # → null: never enrolled")
    return lines


def announce(base_url: str, lines: list[str]) -> None:
    print("\nTry it (sample images: <identity>_<n>.png are enrolled people, unknown_<n>.png strangers):", flush=True)
    for line in lines:
        print(f"  {line}", flush=True)
    print(f"API docs: {base_url}/docs\n", flush=True)


def announce_when_ready(base_url: str, lines: list[str], timeout: float = 300.0) -> None:
    """Poll /ready from a side thread and print the curl lines once the service answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base_url}/ready", timeout=2):
                announce(base_url, lines)
                return
        except OSError:
            time.sleep(0.3)


def serve(bundle: Path, gallery_dir: Path, host: str, port: int, lines_for: Callable[[str, bool], list[str]]) -> None:
    """Run the hardened server (``service.server``) in this process; ``lines_for(base_url, needs_key)`` gives
    the curl lines to announce."""
    from service.app import create_app
    from service.server import serve as run_server
    from service.settings import Settings

    settings = Settings(bundle=bundle, data_dir=gallery_dir, host=host, port=port)  # other CENTERID_* still apply
    base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    lines = lines_for(base_url, bool(settings.api_key_list))
    threading.Thread(target=announce_when_ready, args=(base_url, lines), daemon=True).start()
    if not run_server(create_app(settings), settings):
        raise DemoError("the service did not start (see the log above)")
