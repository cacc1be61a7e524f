"""Model backends behind one small interface; see base.py."""

from ger.backends.base import Backend, create_backend, register_backend

__all__ = ["Backend", "create_backend", "register_backend"]
