"""Model backends behind one small interface; see base.py."""

from ger.backends.base import Backend, FatalBackendError, check_backend, create_backend

__all__ = ["Backend", "FatalBackendError", "check_backend", "create_backend"]
