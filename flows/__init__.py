"""flows: Prefect orchestration of batch generation (see DESIGN.md)."""
