"""Lattica unpickles RPC arguments, results and DHT values: any peer could run code here.

Parallax never sends pickles (every value is msgspec bytes it encoded itself, handled by raw
`_handle_*` methods), but Lattica's Python layer still calls `pickle.loads` on some paths (stub
results, `Lattica.get`, handlers it generates). `install()` points every one of those at an
unpickler that accepts plain builtins only and refuses every global, so a crafted pickle from a
peer raises instead of executing.
"""

from __future__ import annotations

import io
import pickle
import types

_installed = False


class RestrictedUnpickler(pickle.Unpickler):
    """Builds only builtin containers and scalars; any class, function or reducer is refused."""

    def find_class(self, module: str, name: str):  # noqa: ARG002 (signature of the base)
        raise pickle.UnpicklingError(
            f"refused to unpickle {module}.{name}: peers may only send plain data")


def restricted_loads(data: bytes):
    """pickle.loads for untrusted bytes: no globals, hence no code execution."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


def _restricted_smart_deserialize(data, expected_type=None):  # noqa: ARG001 (Lattica's signature)
    if not data:
        return None
    try:
        return restricted_loads(data)
    except Exception as exc:
        raise RuntimeError(f"Failed to deserialize data: {exc}") from None


def install() -> None:
    """Make Lattica's Python layer use the restricted unpickler (idempotent)."""
    global _installed
    if _installed:
        return
    import lattica.client
    import lattica.connection_handler

    # client.py imported `pickle` at module level: give it a pickle whose loads is restricted
    lattica.client.pickle = types.SimpleNamespace(dumps=pickle.dumps, loads=restricted_loads)
    # connection_handler.py resolves smart_deserialize as a module global on every call
    lattica.connection_handler.smart_deserialize = _restricted_smart_deserialize
    _installed = True
