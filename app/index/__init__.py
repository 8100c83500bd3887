"""Versioned index artifacts: manifest, shard backends, item table, and the loader that checks them."""
