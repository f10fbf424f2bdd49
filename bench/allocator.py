"""The C allocator's side of CPU timings: page faults per call, and a ``malloc`` that keeps freed memory.

Imports nothing heavy (no torch), so a test can exercise it in a child process quickly.
"""

from __future__ import annotations

import ctypes


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing, e.g. Windows).

    On Linux, glibc's ``malloc`` hands freed memory back to the kernel (blocks above its mmap
    threshold, and the heap's top beyond its trim threshold), so a forward that allocates fresh
    large temporaries touches new pages (one fault per 4 KiB) on every call; buffers reused across
    calls do not. The bench reports faults per call beside the times because they move the plain
    forward's time from run to run.
    """
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def keep_freed_memory() -> bool:
    """Makes glibc's ``malloc`` keep freed memory in the process (no trim, fixed 32 MiB mmap threshold).

    Blocks up to 32 MiB then come from the heap, which is never trimmed; bigger ones are still
    mapped and unmapped per call. After a warm-up no call pays page faults for memory an earlier
    call freed, so timings measure the work and not the process's allocation history. Returns
    False (and changes nothing) where glibc is not the C library.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # malloc.h
    return all(libc.mallopt(option, value) == 1 for option, value in (
        (m_mmap_threshold, 32 << 20), (m_trim_threshold, 2**31 - 1), (m_top_pad, 64 << 20)))
