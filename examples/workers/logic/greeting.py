"""hello_world: a greeting in one of a few languages."""

from __future__ import annotations

GREETINGS = {
    "en": "Hello, {name}!",
    "fr": "Bonjour, {name} !",
    "de": "Hallo, {name}!",
    "es": "¡Hola, {name}!",
}


def greet(name: str, language: str = "en") -> str:
    """The greeting for ``name``; ``name`` is stripped and must not be empty."""
    name = name.strip()
    if not name:
        raise ValueError("name must not be empty")
    template = GREETINGS.get(language)
    if template is None:
        raise ValueError(f"unknown language {language!r} (known: {', '.join(sorted(GREETINGS))})")
    return template.format(name=name)
