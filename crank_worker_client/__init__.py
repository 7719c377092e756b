"""crank_worker_client."""
