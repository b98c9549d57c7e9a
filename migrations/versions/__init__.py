"""Catalog schema revisions, oldest first (packaged with `migrations`)."""
