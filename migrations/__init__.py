"""Alembic migrations for the wanflow catalog (`storage.catalog`); `Catalog.upgrade()` runs them."""
