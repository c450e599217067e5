"""Offline dataset builder: candidates from sources, validation, Parquet shards and manifest."""
