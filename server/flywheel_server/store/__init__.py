"""Durable storage for prompts, completions, feedback and adapter versions (SQLite or PostgreSQL)."""

from flywheel_server.store.store import Store

__all__ = ["Store"]
