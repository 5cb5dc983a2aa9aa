"""Run Triton kernels on the CPU: test modules call ``setup()`` before importing triton.

Without a GPU, TRITON_INTERPRET=1 makes Triton's interpreter run kernels on CPU tensors
(in float32: it mis-computes ``tl.dot`` on bfloat16 operands).
"""

from __future__ import annotations

import os

import torch

_patched = False


def setup() -> None:
    """Switch on the interpreter when there is no GPU (before triton is first imported)."""
    global _patched
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ.get("TRITON_INTERPRET") != "1" or _patched:
        return
    # Triton 3.6's interpreter turns scalars into 1-element arrays and calls int() on them for
    # range(); NumPy >= 2.4 refuses that, so take the element explicitly.
    try:
        from triton.runtime import interpreter as _interp
    except ImportError:
        return  # the test module's importorskip reports it

    patch_tensor = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor
    _patched = True
