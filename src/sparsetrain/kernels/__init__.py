"""GPU kernels (Triton). Import a kernel module only after :func:`has_triton` says yes.

``import sparsetrain.kernels`` never imports Triton itself: CPU installs without it keep working.
"""

from __future__ import annotations

import functools


@functools.cache
def has_triton() -> bool:
    """Whether Triton imports here (it is needed only for the CUDA fast paths)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install (missing driver libraries, ...)
        return False
    return True
