"""The C library, loaded once, for the system calls Python has no wrapper for (fallocate, statfs,
ioprio_set); each user sets the argument types of the functions it calls."""

from __future__ import annotations

import ctypes
import ctypes.util

LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
