"""Sessions: tests, lint, typecheck, core_isolated, client_isolated, bench, demo.

Run them through ``python3 dev.py nox -s NAME`` (or ``nox -s NAME`` where nox
is installed).
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).resolve().parent

PACKAGES = ["crank_registry", "crank_registry_asgi", "crank_worker_client"]
# Each after the ones it depends on (as in dev.py).
DISTRIBUTIONS = [
    "distributions/crank-registry",
    "distributions/crank-worker-client[tracing,serving]",
    "distributions/crank-registry-asgi",
]


def _install_all(session: nox.Session) -> None:
    editable: list[str] = []
    for dist in DISTRIBUTIONS:
        editable += ["-e", dist]
    session.install(*editable, "-r", "requirements-dev.txt")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite."""
    _install_all(session)
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over everything."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the three packages and the demo."""
    _install_all(session)
    session.run(
        "mypy", "-p", PACKAGES[0], "-p", PACKAGES[1], "-p", PACKAGES[2], "-p", "examples.demo"
    )


@nox.session(reuse_venv=False)
def core_isolated(session: nox.Session) -> None:
    """The core installs and imports with attrs, cattrs and packaging alone."""
    session.install("distributions/crank-registry")
    session.chdir(session.create_tmp())  # import the installed copy, not the tree
    session.run(
        "python",
        "-c",
        _ISOLATION_CHECK,
        "crank_registry",
        "starlette,httpx,anyio,hypercorn,opentelemetry,cryptography,h11,trio",
    )


@nox.session(reuse_venv=False)
def client_isolated(session: nox.Session) -> None:
    """crank-worker-client installs without any server package, with its serving extra too."""
    client = str(ROOT / "distributions" / "crank-worker-client")
    session.install(str(ROOT / "distributions" / "crank-registry"), client)
    session.chdir(session.create_tmp())
    # Without the extra: the client imports, jsonschema is not needed, and
    # the serving module says which extra it wants.
    session.run(
        "python",
        "-c",
        _ISOLATION_CHECK,
        "crank_worker_client",
        "starlette,hypercorn,cryptography,crank_registry_asgi,jsonschema",
    )
    session.run("python", "-c", _NEEDS_EXTRA, "crank_worker_client.serving", "[serving]")
    session.install(f"{client}[serving]")
    session.run(
        "python",
        "-c",
        _ISOLATION_CHECK,
        "crank_worker_client.serving",
        "starlette,hypercorn,cryptography,crank_registry_asgi",
    )
    session.run(
        "python",
        "-c",
        _NO_DISTRIBUTIONS,
        "starlette,hypercorn,cryptography,crank-registry-asgi,uvicorn,granian",
    )


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmarks; each prints its figures and the ratios to its targets."""
    _install_all(session)
    scripts = session.posargs or ["benchmarks/core.py"]
    for script in scripts:
        session.run("python", script)


@nox.session
def demo(session: nox.Session) -> None:
    """The full demo (the same as ``python3 dev.py demo``)."""
    _install_all(session)
    session.run("python", "-m", "examples.demo", *session.posargs)


_ISOLATION_CHECK = """
import importlib, sys
package, forbidden = sys.argv[1], sys.argv[2].split(",")
module = importlib.import_module(package)
assert "site-packages" in module.__file__, f"imported {module.__file__}, not the installed copy"
leaked = sorted({name.split(".")[0] for name in sys.modules} & set(forbidden))
if leaked:
    sys.exit(f"importing {package} pulled in {', '.join(leaked)}")
print(f"{package}: imported alone, none of {', '.join(forbidden)} loaded")
"""

_NEEDS_EXTRA = """
import importlib, sys
module, extra = sys.argv[1], sys.argv[2]
try:
    importlib.import_module(module)
except ImportError as error:
    if extra not in str(error):
        sys.exit(f"importing {module} without {extra} failed without naming it: {error}")
    print(f"{module} without {extra}: {error}")
else:
    sys.exit(f"{module} imported without {extra}")
"""

_NO_DISTRIBUTIONS = """
import importlib.metadata, sys
forbidden = {name.lower() for name in sys.argv[1].split(",")}
installed = {dist.metadata["Name"].lower() for dist in importlib.metadata.distributions()}
found = sorted(installed & forbidden)
if found:
    sys.exit(f"the environment holds server packages: {', '.join(found)}")
print(f"installed: {', '.join(sorted(installed))}; no server packages")
"""
