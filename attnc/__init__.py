"""attnc: a compiler for attention patterns.

Write which query may see which key (and how scores change) in a small language; attnc lowers it to
a block-sparse plan and specialized Triton FlashAttention kernels, exposed as differentiable torch ops.

    import attnc
    kern = attnc.compile("examples/sliding_window.attn", window=256)
    out = kern(q, k, v)
"""

from .errors import AttncError, InputError, PatternError, PatternSyntaxError
from .runtime import Kernel, compile

__version__ = "0.1.0"

__all__ = ["compile", "Kernel", "AttncError", "PatternSyntaxError", "PatternError", "InputError",
           "__version__"]
