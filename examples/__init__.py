"""Runnable examples: nine workers, the in-process core, embedding and tracing."""
