"""``python -m benchmarks``: how much time and memory napo-kernels saves on a preference-loss step.

Cases (``--case``, default ``all`` = rec, dense, scaling; ``trl`` runs when named):

- ``rec``: the LLM-recommender step of the issue (B = 8, K = 3 shared, 128 + 8 tokens, H = 1024,
  V = 32000, fp32), with a frozen (LoRA) and a trainable ``lm_head``;
- ``dense``: pairwise DPO with every one of T = 256 tokens scored;
- ``scaling``: pool size, vocabulary, scored tokens and napo-kernels' chunk size around the rec
  shape (frozen ``lm_head`` unless ``--variants`` says otherwise), plus the cost of growing the
  shared pool from 3 to 93 negatives per prompt at the same forward work;
- ``trl``: one optimizer step of stock ``trl.DPOTrainer`` against the drop-in ``FusedDPOTrainer``
  (``napo_kernels.integrations.trl``) on the same batch: a 4-layer Llama (H = 512, V = 32000),
  4 prompts of 256 tokens, 16-token completions, a reference model, K = 1 and K = 3 (stock TRL on
  the expanded pairs). Needs ``trl``; takes a few minutes on 2 cores.

Writes a table per case, PASS/MISS per acceptance bar, ``--out/bench-<time>.json`` and a PNG per
sweep. ``--quick`` runs tiny shapes in seconds (a smoke run: its ratios mean nothing).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

CASES = ("rec", "dense", "scaling", "trl")
ALL_CASES = ("rec", "dense", "scaling")  # what ``all`` runs: trl needs the trl package and minutes
SWEEPS = ("pool", "vocab", "tokens", "chunk")
BASELINES = ("plain", "sliced", "compile", "liger", "cce", "bare")  # as in benchmarks.contenders


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--case",
        type=_csv,
        default=["all"],
        help=f"all ({', '.join(ALL_CASES)}), or a comma list of {', '.join(CASES)}",
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes, few runs: a smoke run in seconds")
    p.add_argument("--out", default="bench-results", help="directory for the JSON and PNG files")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--backends",
        type=_csv,
        default=None,
        help="napo-kernels backends (torch, cpp, triton, cuda); default: every one available on "
        "--device (triton on CPU only when named: it runs under the slow interpreter)",
    )
    p.add_argument(
        "--contenders",
        type=_csv,
        default=None,
        help="baselines to run, from plain, sliced, compile, liger, cce, bare (napo-kernels always "
        "runs); default: all for rec/dense, plain,sliced,bare for scaling",
    )
    p.add_argument(
        "--variants",
        type=_csv,
        default=None,
        help="frozen, trainable (lm_head); default: both for rec/dense, frozen for scaling",
    )
    p.add_argument("--sweeps", type=_csv, default=list(SWEEPS), help="scaling sweeps: " + ", ".join(SWEEPS))
    p.add_argument("--repeats", type=int, default=None, help="timed runs per contender (default 5, quick 3)")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of timed runs per contender and shape before fewer runs are taken (min 3)",
    )
    p.add_argument(
        "--max-logits-gib",
        type=float,
        default=0.6,
        help="scaling: skip all-position baselines whose full logits would exceed this",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory probes")
    p.add_argument(
        "--busy-core",
        action="store_true",
        help="run next to a process that keeps one core busy (a spinning subprocess), and judge the "
        "contention bars instead of the quiet-machine time bars",
    )
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.add_argument("--replot", metavar="JSON", default=None,
                   help="only redraw the PNG plots of a saved run (its bench-*.json) and exit")  # fmt: skip
    args = p.parse_args(argv)
    cases = ALL_CASES if "all" in args.case else tuple(args.case)
    bad = [c for c in cases if c not in CASES]
    if bad:
        p.error(f"--case: unknown {bad}; choose from all, {', '.join(CASES)}")
    args.case = cases
    if any(v not in ("frozen", "trainable") for v in args.variants or ()):
        p.error("--variants: choose from frozen, trainable")
    if any(c not in BASELINES for c in args.contenders or ()):
        p.error(f"--contenders: choose from {', '.join(BASELINES)}")
    if any(s not in SWEEPS for s in args.sweeps):
        p.error(f"--sweeps: choose from {', '.join(SWEEPS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        return _replot(args.replot)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # tables appear as cases finish, even in a log file
    if args.device == "cpu" and args.backends and "triton" in args.backends and not args.quick:
        print("note: triton on CPU runs under its interpreter (about 1 ms per program instance): "
              "full shapes take very long; use --quick", file=sys.stderr)  # fmt: skip
    if args.device == "cpu" and args.backends and "triton" in args.backends:
        # Triton runs on CPU only under its interpreter, which must be chosen before triton is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # imported here, after the environment is settled
    import torch

    from .runner import Runner

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    start = time.perf_counter()
    runner = Runner(args, argv if argv is not None else sys.argv[1:])
    runner.run()
    print(f"\nbenchmark finished in {time.perf_counter() - start:.0f} s; results: {runner.json_path}")
    return 0


def _replot(path: str) -> int:
    import json

    from .plots import plot_sweep

    with open(path) as f:
        payload = json.load(f)
    stem = path[: -len(".json")] if path.endswith(".json") else path
    for entry in payload.get("scaling", []):
        out = plot_sweep(entry, f"{stem}-scaling-{entry['sweep']}-{entry['variant']}.png")
        print(out or "matplotlib is not installed")
    return 0
