"""Native CPU kernels (C++ built at first use, called through ctypes): see :mod:`.build`."""
from .build import NATIVE_ENV, load_native, native_enabled, native_status, set_native_enabled

__all__ = ["NATIVE_ENV", "load_native", "native_enabled", "native_status", "set_native_enabled"]
