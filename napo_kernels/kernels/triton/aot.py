"""Compile the Triton kernels ahead of time for a GPU architecture, on a machine without a GPU.

The interpreter (``TRITON_INTERPRET=1``) runs the kernels' Python, not their compiled form: it
cannot show that a kernel compiles for Ampere/Hopper, nor what a launch configuration costs in
registers, spills and shared memory. This module drives Triton's own compiler (to PTX, then
``ptxas`` to a cubin) for every kernel x autotune configuration x input dtype, so those facts are
known before any GPU exists. It must run without ``TRITON_INTERPRET=1`` (Triton then builds real
kernels instead of interpreted ones).

    python -m napo_kernels.kernels.triton.aot --arch 80 90            # every config, every dtype
    python -m napo_kernels.kernels.triton.aot --arch 90 --quick       # one config per kernel
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch

# Opt-in shared memory per block (bytes): A100 (sm_80), H100 (sm_90).
SHARED_LIMIT = {80: 166912, 90: 232448}


@dataclass
class Compiled:
    kernel: str
    arch: int
    dtype: str
    config: str
    registers: int
    spill_bytes: int
    shared_bytes: int

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= SHARED_LIMIT.get(self.arch, SHARED_LIMIT[80])

    def row(self) -> str:
        ok = "ok" if self.fits else "SHARED MEMORY OVER LIMIT"
        return (
            f"sm_{self.arch}  {self.kernel:<30} {self.dtype:<9} {self.config:<44} "
            f"regs {self.registers:>3}  spills {self.spill_bytes:>5} B  shared {self.shared_bytes:>6} B  {ok}"
        )


def _cases(quick: bool, dtypes: tuple[torch.dtype, ...]) -> Iterator[tuple]:
    """``(name, JITFunction, signature, constexprs, triton.Config, dtype)`` for every kernel variant
    (``.fn`` of an autotuned kernel is its JITFunction)."""
    import triton
    import triton.language as tl

    from . import linear_logprobs as lin
    from . import logits_logprobs as logit
    from . import preference as pref
    from .utils import dot_precision, tl_acc, tl_dot_dtype

    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}

    def first(configs):
        return configs[:1] if quick else configs

    # the head's compile-time constants (utils.head_logits): a plain head, and Gemma 2's soft cap
    # together with a logit scale (the scaled-only variant is the plain one plus a multiply)
    heads = {"": dict(SCALE=1.0, SOFTCAP=0.0), "_softcap": dict(SCALE=0.5, SOFTCAP=30.0)}

    for dtype in dtypes:
        x, acc = f"*{names[dtype]}", "*fp64" if dtype == torch.float64 else "*fp32"
        ints = dict.fromkeys(("R", "V", "H", "stride_h", "stride_w"), "i32")
        common = dict(HAS_BIAS=True, ACC=tl_acc(dtype), DOT=tl_dot_dtype(dtype), PREC=dot_precision(dtype))
        stage1 = dict(h_ptr=x, w_ptr=x, b_ptr=x, t_ptr="*i64")
        for suffix, head in heads.items():
            for cfg in first(lin._ROW_PROGRAM_CONFIGS):
                sig = dict(**stage1, max_ptr=acc, sum_ptr=acc, pick_ptr=acc, e_ptr=acc, k_ptr=acc, **ints)
                # with E: the one-pass forward of a head that needs dH; kept: a trainable one's logits
                for expected, keep in ((False, False), (True, False), (True, True)):
                    name = "linear_forward" + ("_expected" * expected) + ("_kept" * keep) + suffix
                    const = dict(EXPECTED=expected, KEEP=keep, **common, **head)
                    yield name, lin._forward_kernel.fn, sig, const, cfg, dtype
                sig = dict(g_ptr=acc, **stage1, lse_ptr=acc, k_ptr=acc, out_ptr=acc, **ints)
                const = dict(KEPT=False, **common, **head)
                yield "linear_hidden" + suffix, lin._hidden_kernel.fn, sig, const, cfg, dtype
            for cfg in first(lin._VOCAB_PROGRAM_CONFIGS):
                sig = dict(g_ptr=acc, **stage1, lse_ptr=acc, k_ptr=acc, dw_ptr=acc, db_ptr=acc, **ints)
                for kept in (False, True):  # logits recomputed, or read from the forward's
                    const = dict(NEED_WEIGHT=True, NEED_BIAS=True, KEPT=kept, **common, **head)
                    yield (
                        "linear_weight" + ("_kept" * kept) + suffix,
                        lin._weight_kernel.fn,
                        sig,
                        const,
                        cfg,
                        dtype,
                    )
        ints = dict(R="i32", V="i32", stride_x="i32")
        for cfg in first(logit._FORWARD_CONFIGS):
            sig = dict(x_ptr=x, t_ptr="*i64", logp_ptr=acc, lse_ptr=acc, **ints)
            yield "logits_forward", logit._forward_kernel.fn, sig, dict(ACC=tl_acc(dtype)), cfg, dtype
        for cfg in first(logit._BACKWARD_CONFIGS):
            sig = dict(g_ptr=acc, x_ptr=x, t_ptr="*i64", lse_ptr=acc, out_ptr=x, **ints)
            yield "logits_backward", logit._backward_kernel.fn, sig, dict(ACC=tl_acc(dtype)), cfg, dtype
        if dtype in (torch.float32, torch.float64):  # stage 2 runs in the accumulation dtype
            sig = dict(chosen_ptr=acc, rej_ptr=acc, sel_ptr="*u8", coef_ptr=acc, margin_ptr=acc, rows_ptr=acc,
                       weights_ptr=acc, M="i32")  # fmt: skip
            for mean in (False, True):
                cfg = triton.Config({"BLOCK_M": 1024}, num_warps=4)
                yield "preference" + ("_mean" * mean), pref._preference_kernel, sig, dict(
                    MEAN=mean, ACC=tl_acc(dtype)), cfg, dtype  # fmt: skip
    del tl


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """``(registers, spill bytes)`` from ``ptxas -v`` (Triton's bundled ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o",
             os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return int(regs.group(1)) if regs else -1, max(spills, default=0)


def compile_all(archs: tuple[int, ...] = (80, 90), quick: bool = False, dtypes=None, progress: bool = True):
    """Compile every kernel variant for each architecture; returns a list of :class:`Compiled`.
    Raises whatever Triton raises when a kernel does not compile."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter builds no compiled kernels")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    dtypes = dtypes or (torch.bfloat16, torch.float16, torch.float32, torch.float64)
    cases = list(_cases(quick, dtypes))
    try:
        from tqdm import tqdm

        jobs = tqdm([(a, c) for a in archs for c in cases], disable=not progress, desc="compiling")
    except ImportError:
        jobs = [(a, c) for a in archs for c in cases]
    out = []
    for arch, (name, fn, sig, const, cfg, dtype) in jobs:
        constexprs = {**const, **cfg.kwargs}
        signature = {**sig, **dict.fromkeys(constexprs, "constexpr")}
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        regs, spills = _ptxas_usage(kernel.asm["ptx"], arch)
        label = " ".join(f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in cfg.kwargs.items())
        label += f" w{cfg.num_warps} s{cfg.num_stages}"
        dtype_name = str(dtype).replace("torch.", "")
        out.append(Compiled(name, arch, dtype_name, label, regs, spills, kernel.metadata.shared))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80 90)")
    parser.add_argument("--quick", action="store_true", help="only the first autotune config of each kernel")
    args = parser.parse_args(argv)
    results = compile_all(tuple(args.arch), args.quick)
    for r in results:
        print(r.row())
    return 0 if all(r.fits for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
