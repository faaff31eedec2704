"""napo-kernels benchmark suite: ``python -m benchmarks`` (``make bench``).

Measures, on the same inputs in the same run, the time and peak extra memory of one forward +
backward step of a multi-negative preference loss for plain PyTorch (as TRL computes it), plain
PyTorch on the scored rows only, ``torch.compile``, Liger-Kernel and Cut Cross-Entropy (when
installed) and napo-kernels on every available backend. See ``benchmarks.cli`` for the cases.

Modules: ``cases`` (shapes and inputs), ``contenders`` (the steps), ``measure`` (time and memory),
``bars`` (the acceptance bars), ``report`` (tables, JSON), ``plots`` (PNG), ``runner`` (the run).
"""
