"""crank_registry_asgi."""
