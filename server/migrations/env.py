"""Alembic's environment for the registry: always run from offsite.server.migrations.upgrade
(or `python -m offsite.server.migrations`), which hands over an open connection."""

from alembic import context

connection = context.config.attributes["connection"]
metadata = context.config.attributes.get("target_metadata")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
