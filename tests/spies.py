"""Record what a patched function returns, so a test can assert which path the launcher took."""

from contextlib import contextmanager
from unittest import mock


@contextmanager
def returns_of(owner, name: str):
    """Patch ``owner.name`` with a wrapper that calls the real function and records each return value;
    yields the list of values."""
    real, seen = getattr(owner, name), []

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    with mock.patch.object(owner, name, spy):
        yield seen
