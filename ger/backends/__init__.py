"""Model backends behind one small interface; see base.py."""

from ger.backends.base import Backend, FatalBackendError, create_backend, register_backend

__all__ = ["Backend", "FatalBackendError", "create_backend", "register_backend"]
