"""``python -m service.admin``: operator commands on the gallery, with the service's ``CENTERID_*`` settings.

    python -m service.admin models                     # stored vectors per model fingerprint
    python -m service.admin forget-model FINGERPRINT   # delete one model's vectors (after a rollout)

Each entry keeps one vector per model that embedded it (``service.store``), so that replicas of an old and
a new bundle can serve side by side and going back is a restart. Once no replica runs a model, its vectors
only take space: ``forget-model`` deletes them in one transaction. Entries, images and the other models'
vectors stay; a replica later started on the forgotten model embeds the stored images again.

On the embedded SQLite gallery, stop the service first (one process per data folder); on PostgreSQL it
runs beside the replicas. Problems print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from pydantic import ValidationError

from service.gallery_db import DB_FILE
from service.gallery_input import GalleryError
from service.gallery_rows import stored_models
from service.settings import Settings
from service.store import Store, check_schema, open_store


def forget_model(store: Store, fingerprint: str) -> int:
    """Delete every vector of ``fingerprint``; returns how many there were."""
    with store.transaction() as db:
        count = int(db.execute("SELECT COUNT(*) FROM embeddings WHERE fingerprint = ?", (fingerprint,))[0][0])
        db.execute("DELETE FROM embeddings WHERE fingerprint = ?", (fingerprint,))
    return count


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m service.admin", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("models", help="stored vectors per model fingerprint")
    forget = commands.add_parser("forget-model", help="delete the vectors of one model")
    forget.add_argument("fingerprint")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, settings: Settings) -> None:
    # A replica's folder is locked by that replica; the shared database needs none of it.
    folder = Path(tempfile.mkdtemp(prefix="centerid-admin-")) if settings.database_url else settings.data_dir
    if not settings.database_url and not (folder / DB_FILE).is_file():
        raise GalleryError(f"no gallery in {folder} (set CENTERID_DATA_DIR or CENTERID_DATABASE_URL)")
    store = open_store(folder, settings.database_url)
    try:
        with store.transaction() as db:
            check_schema(db)
        if args.command == "models":
            for fingerprint, count in stored_models(store).items():
                print(f"{fingerprint}\t{count}")
        else:
            print(f"deleted {forget_model(store, args.fingerprint)} vectors of model {args.fingerprint}")
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args, Settings())
    except ValidationError as error:
        print(f"centerid admin: invalid setting: {error.errors()[0]['msg']}", file=sys.stderr)
        return 2
    except GalleryError as error:
        print(f"centerid admin: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
