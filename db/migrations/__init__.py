"""Alembic revisions of the application database. Run them with `boxctl db upgrade` (db/schema.py); add one with
`python -m db.migrations "what changes"`."""
