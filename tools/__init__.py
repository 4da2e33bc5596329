"""Scripts that are not DVC stages (chat with the adapter, export it, maintenance): `python -m tools.<name>`."""
