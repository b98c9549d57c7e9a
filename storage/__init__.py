"""storage: streaming videos into object storage and the SQL catalog (see DESIGN.md)."""
