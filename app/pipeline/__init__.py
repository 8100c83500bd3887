"""Offline jobs: export the model, build an index version."""
