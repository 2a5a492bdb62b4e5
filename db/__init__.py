"""The application database: table models, the engine, quota and admin data."""
