"""``python -m service``: serve the app on CENTERID_HOST:CENTERID_PORT through the hardened server of
``service.server`` (one worker process: the model and the gallery's write lock live in it).

Anything that stops it from starting prints one line, ``centerid cannot start: ...``, and exits non-zero.
"""

from __future__ import annotations

import sys

from pydantic import ValidationError

from service.server import StartupRefused, serve
from service.settings import Settings


def settings_problem(error: ValidationError) -> str:
    """The first invalid setting, named as its environment variable, on one line."""
    first = error.errors()[0]
    name = "CENTERID_" + "_".join(str(part) for part in first["loc"]).upper()
    return f"{name}: {first['msg']} (got {str(first.get('input'))[:80]!r})"


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as error:
        print(f"centerid cannot start: {settings_problem(error)}", file=sys.stderr)
        return 2
    from service.app import create_app  # after the settings: importing the app reads them again

    try:
        started = serve(create_app(settings), settings)
    except StartupRefused as error:
        print(f"centerid cannot start: {error}", file=sys.stderr)
        return 2
    return 0 if started else 3


if __name__ == "__main__":
    sys.exit(main())
