"""`python -m db.migrations "what changes"`: write the next revision (db/migrations/versions/NNNN_what_changes.py)
from what db/models.py has that the revisions so far do not make. Alembic's autogenerate, against a scratch
SQLite database brought to the current head; read what it wrote before committing it."""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from alembic import command
from alembic.config import Config

from db.engine import make_engine
from db.schema import alembic_config, head, upgrade


def _ruff_after_writing(config: Config) -> None:
    """Autogenerate writes in its own style, which the project's lint refuses."""
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or "ruff"
    config.set_section_option("post_write_hooks", "hooks", "fix, format")
    for hook, options in (("fix", "check --fix --quiet"), ("format", "format --quiet")):
        config.set_section_option("post_write_hooks", f"{hook}.type", "exec")
        config.set_section_option("post_write_hooks", f"{hook}.executable", ruff)
        config.set_section_option("post_write_hooks", f"{hook}.options", f"{options} REVISION_SCRIPT_FILENAME")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m db.migrations", description=__doc__)
    parser.add_argument("message", help="what the revision changes, e.g. 'add vm.pool'")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        engine = make_engine(f"sqlite:///{scratch}/head.db")
        upgrade(engine)
        with engine.begin() as connection:
            config = alembic_config(connection)
            _ruff_after_writing(config)
            # Numbered revisions (0001, 0002, ...): their order reads from the file names.
            command.revision(config, args.message, autogenerate=True, rev_id=f"{int(head()) + 1:04d}")
        engine.dispose()


if __name__ == "__main__":
    main()
