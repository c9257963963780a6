"""Exceptions raised for bad input. The CLI prints them as one line, without a traceback."""


class TissueGraphError(Exception):
    """A user-facing error: the message names the file or field and what to do."""


class InputError(TissueGraphError, ValueError):
    """Bad or missing input data (a file, a column, a field)."""


class ConfigError(TissueGraphError, ValueError):
    """An invalid configuration value."""


class MissingDependencyError(TissueGraphError, ImportError):
    """An optional dependency is not installed."""


def one_line(exc: BaseException, limit: int | None = 160) -> str:
    """The first non-empty line of an exception's message, or its type name when empty.

    Text longer than ``limit`` (``None``: no limit) is cut at a word boundary and marked with
    an ellipsis, so a message never ends mid-word.
    """
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    if limit is not None and len(text) > limit:
        cut = text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:")
        text = cut + " ..."
    return text


def require(module: str, extra: str | None = None, purpose: str = ""):
    """Import an optional dependency or fail with the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        what = f" for {purpose}" if purpose else ""
        hint = (
            f"pip install 'tissuegraph[{extra}]' (in a checkout: uv sync --extra {extra})"
            if extra
            else f"pip install {module}"
        )
        raise MissingDependencyError(f"{module} is needed{what}: {hint}") from exc
