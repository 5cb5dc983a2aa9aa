"""Layers: the decoder's building blocks on the GPU, each beside its plain-torch reference.

``attention/`` (the backend interface and KV layout, the torch reference, the Triton paged
kernels), ``fused_ops`` (residual add + RMSNorm, RoPE + K/V write, SiLU·mul), ``gemv`` (the
small-M projection and its tuner) and ``pdl`` (programmatic dependent launch). Kernels live in
``*_kernels.py``, imported on first GPU use. Models import these; nothing here imports the
engine."""
