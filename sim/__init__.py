"""The N-worker simulator (being written)."""
