"""`clora runtime`: one runtime server (HTTP API + the engine's tick loop). See main.py."""

from clora_runtime.server.main import add_arguments, main

__all__ = ["add_arguments", "main"]
