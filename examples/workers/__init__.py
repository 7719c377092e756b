"""Nine example workers, each runnable with ``python -m examples.workers.NAME``.

Each program declares its capabilities (full JSON Schemas), serves them on
the invocation convention of :mod:`crank_worker_client.serving` over HTTPS
with its own worker certificate, and registers with the controller. The
logic of each worker lives in a pure module under :mod:`examples.workers.logic`.
"""

#: The nine worker programs (module names, also their worker ids).
WORKER_NAMES = (
    "hello_world",
    "streaming",
    "document_conversion",
    "email_classifier",
    "semantic_search",
    "zettel_create",
    "zettel_search",
    "zettel_link",
    "image_classifier",
)
