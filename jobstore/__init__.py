"""The job store: SQLAlchemy models and the only functions that read or write job records.

Shared by the API and the workers; imports neither torch nor FastAPI nor Celery.
SQLite (WAL) by default, PostgreSQL by URL; schema changes go through Alembic migrations.
"""
