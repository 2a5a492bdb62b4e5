"""One module per schema revision, oldest first (0001 is the schema that `create_all` made before Alembic)."""
