"""Our own CPU kernels (cpu_kernels.cpp), compiled on first use with the system's C++ compiler and cached by
torch.utils.cpp_extension (~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR). None where they cannot run."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger("splitserve.engine.kernels")
_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
_loaded: ModuleType | None = None
_tried = False


def load() -> ModuleType | None:
    """The compiled module on AVX2 (or better) CPUs with a C++ compiler, else None (callers fall back)."""
    global _loaded, _tried
    if _tried:
        return _loaded
    _tried = True
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512") or shutil.which("c++") is None:
        return None
    try:
        from torch.utils.cpp_extension import load as build
        _loaded = build(name="splitserve_cpu_kernels", sources=[str(_SOURCE)],
                        extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"], extra_ldflags=["-fopenmp"],
                        verbose=False)
    except Exception as exc:  # a missing compiler or headers: the engine runs without them
        log.warning("CPU kernels unavailable (%s); using torch's", exc)
    return _loaded
