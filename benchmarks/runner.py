"""Runs the chosen cases: times the contenders, probes their memory, prints tables and bars, writes
the JSON and the plots. One :class:`Runner` per ``python -m benchmarks`` invocation."""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch
from tqdm.auto import tqdm

import napo_kernels
from napo_kernels import dispatch

from . import bars as bars_mod
from . import contention
from .cases import VARIANTS, Shape, dense_shape, pool_bar_shapes, rec_shape, scaling_sweeps
from .measure import Timed, first_line, probe_memory, time_contenders, time_stage2
from .plots import plot_sweep
from .report import format_table, machine_facts, make_rows, pick_napo, write_json

TABLE_BASELINES = ("plain", "sliced", "compile", "liger", "cce", "bare")
SCALING_BASELINES = ("plain", "sliced", "bare")
MEMORY_COUNTER = (
    "CPU: torch.profiler allocator events (peak of the running allocation sum during one fwd+bwd step, "
    "fresh process per contender); RSS: VmHWM growth; CUDA: torch.cuda.max_memory_allocated"
)
ALL_POSITIONS = ("plain", "compile")  # contenders that project every position onto the vocabulary


class Runner:
    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        self.args = args
        self.device = args.device
        self.quick = args.quick
        self.repeats = args.repeats or (3 if args.quick else 5)
        self.run_id = time.strftime("%Y%m%d-%H%M%S")
        self.json_path = os.path.join(args.out, f"bench-{self.run_id}.json")
        self.napo_names = self._napo_names()
        auto = "napo-" + dispatch.resolve("auto", torch.device(self.device))
        # ratios and bars refer to what users get ('auto'), or to the first backend asked for
        self.auto = auto if auto in self.napo_names or not self.napo_names else self.napo_names[0]
        self.payload: dict = {
            "run_id": self.run_id,
            "command": "python -m benchmarks " + " ".join(argv),
            "machine": machine_facts(),
            "device": self.device,
            "quick": self.quick,
            "backends": {
                k: {"available": v.available, "reason": v.reason} for k, v in napo_kernels.backends().items()
            },
            "memory_counter": MEMORY_COUNTER,
            "tables": [],
            "scaling": [],
            "pool": None,
            "bars": [],
            "busy_core": bool(getattr(args, "busy_core", False)),
            "load_average": {"start": contention.load_average()},
        }

    # ------------------------------------------------------------------------------------------
    def _napo_names(self) -> list[str]:
        infos = napo_kernels.backends()
        if self.args.backends:
            unknown = [b for b in self.args.backends if b not in infos]
            if unknown:
                raise SystemExit(f"--backends: unknown {unknown}; choose from {', '.join(infos)}")
            return [f"napo-{b}" for b in self.args.backends]
        names = []
        for b, info in infos.items():
            if self.device not in info.devices:
                continue
            if b == "triton" and self.device == "cpu" and not self.quick:
                continue  # the interpreter is for correctness, not timing: ask for it with --backends triton
            names.append(f"napo-{b}")
        return names

    def _baselines(self, default: tuple[str, ...]) -> list[str]:
        return list(self.args.contenders) if self.args.contenders is not None else list(default)

    def _variants(self, default: tuple[str, ...]) -> list[str]:
        return list(self.args.variants) if self.args.variants else list(default)

    def _budget(self, scaling: bool) -> float:
        if self.args.budget is not None:
            return self.args.budget
        return 2.0 if self.quick else (5.0 if scaling else 10.0)

    def _skip_big(self, name: str, shape: Shape) -> str | None:
        gib = shape.all_rows * shape.vocab * 4 / 2**30
        if name in ALL_POSITIONS and gib > self.args.max_logits_gib:
            return f"skipped: [{shape.all_rows}, {shape.vocab}] logits = {gib:.1f} GiB (> --max-logits-gib)"
        return None

    def _time(self, entries, bar, tag: str, scaling: bool, skip=lambda n, s: None, repeats=None):
        return time_contenders(
            entries,
            self.device,
            repeats=repeats or (min(3, self.repeats) if scaling else self.repeats),
            budget_s=self._budget(scaling),
            min_repeats=min(3, self.repeats),
            skip=skip,
            progress=lambda d: bar.set_postfix_str(f"{tag}: {d}", refresh=True),
        )

    def _probe(self, name: str, shapes: list[Shape], bar) -> list[dict]:
        bar.set_postfix_str(f"memory: {name} (fresh process)", refresh=True)
        out = probe_memory(name, shapes, self.device)
        bar.update()
        return out

    # ------------------------------------------------------------------------------------------
    def run(self) -> None:
        self._print_header()
        with contention.BusyCore() if self.payload["busy_core"] else contextlib.nullcontext():
            for case in self.args.case:
                if case == "scaling":
                    self.run_scaling()
                elif case == "trl":
                    self.run_trl()
                else:
                    self.run_table(case)
                write_json(self.json_path, self.payload)  # after every case: a crash keeps what was measured
        self.payload["load_average"]["end"] = contention.load_average()
        judged = bars_mod.judge(self.payload["tables"], self.payload["pool"], self.payload.get("trl"))
        if self.payload["busy_core"]:  # quiet-machine time bars do not apply; memory does not depend on load
            judged = contention.judge(self.payload["tables"]) + [b for b in judged if "memory" in b.name]
        self.payload["bars"] = bars_mod.as_dicts(judged)
        write_json(self.json_path, self.payload)
        self._print_summary(judged)

    def _print_header(self) -> None:
        m = self.payload["machine"]
        quick = " | QUICK (tiny shapes)" if self.quick else ""
        print(
            f"napo-kernels benchmark | {m['cpu']} | {m['cpu_count']} CPUs, {m['torch_threads']} torch "
            f"threads | torch {m['versions']['torch']} | device {self.device}{quick}"
        )
        backs = ", ".join(
            f"{k}: {'yes' if v['available'] else 'no (' + v['reason'][:60] + ')'}"
            for k, v in self.payload["backends"].items()
        )
        print(f"backends: {backs}")
        if self.payload["busy_core"]:
            print(
                f"--busy-core: another process keeps one core busy; load average {_load_text(self.payload)}"
            )
        print(
            f"napo-kernels contenders: {', '.join(self.napo_names) or 'none'}; ratios refer to {self.auto} "
            f"(the 'auto' choice on {self.device}); ratio columns are contender / napo-kernels\n"
        )

    # ------------------------------------------------------------------------------------------
    def run_table(self, case: str) -> None:
        base = rec_shape(self.quick) if case == "rec" else dense_shape(self.quick)
        names = self._baselines(TABLE_BASELINES) + self.napo_names
        variants = self._variants(VARIANTS)
        timed: dict[str, dict[str, Timed]] = {}
        probes = [n for n in names if n != "bare"]
        bar = tqdm(
            total=len(variants) + (0 if self.args.no_memory else len(probes)),
            desc=case,
            leave=False,
            disable=None,
        )
        for v in variants:
            shape = base.with_variant(v)
            timed[v] = self._time([(n, n, shape) for n in names], bar, v, scaling=False)
            bar.update()
        memory: dict[str, dict[str, dict]] = {v: {} for v in variants}
        if not self.args.no_memory:
            for name in probes:
                ok = [v for v in variants if timed[v][name].status == "ok"]
                if not ok:
                    bar.update()
                    continue
                for v, res in zip(ok, self._probe(name, [base.with_variant(v) for v in ok], bar)):
                    memory[v][name] = res
        bar.close()
        for v in variants:
            shape = base.with_variant(v)
            napo = pick_napo(timed[v], self.auto)
            rows = make_rows(timed[v], memory[v], napo, shape.grad_bytes)
            chunk, strategy = _napo_strategy(shape, self.device, napo)
            self.payload["tables"].append(
                {
                    "case": case,
                    "variant": v,
                    "shape": shape.to_dict(),
                    "describe": shape.describe(),
                    "napo": napo,
                    "napo_chunk_size": chunk,
                    "napo_strategy": strategy,
                    "rows": rows,
                }
            )
            print(format_table(f"{case} | {shape.describe()}", rows, napo))
            print()

    # ------------------------------------------------------------------------------------------
    def run_trl(self) -> None:
        from .trl_case import run_case

        reps = self.args.repeats or (2 if self.quick else 5)
        self.payload["trl"] = run_case(self.quick, reps, memory=not self.args.no_memory)

    # ------------------------------------------------------------------------------------------
    def run_scaling(self) -> None:
        variants = self._variants(("frozen",))
        sweeps = [s for s in scaling_sweeps(self.quick) if s.name in self.args.sweeps]
        baselines = self._baselines(SCALING_BASELINES)
        plan = []  # (sweep, x, variant, shape, names)
        for sweep in sweeps:
            names = [n for n in baselines if not sweep.napo_only or n in ("sliced", "bare")] + self.napo_names
            for x, shape in sweep.points:
                for v in variants:
                    plan.append((sweep, x, v, shape.with_variant(v), names))
        probe_names = sorted({n for *_, names in plan for n in names if n != "bare"})
        bar = tqdm(
            total=len(plan) + 2 * len(variants) + (0 if self.args.no_memory else len(probe_names) + 1),
            desc="scaling",
            disable=None,
            leave=False,
        )
        # a shape that several sweeps share (the rec point) is measured once
        first: dict[tuple, int] = {}
        timed: list[dict[str, Timed]] = []
        for i, (sweep, x, v, shape, names) in enumerate(plan):
            key = (shape, tuple(names))
            if key in first:
                timed.append(timed[first[key]])
            else:
                first[key] = i
                tag = f"{sweep.name}={x} {v}"
                timed.append(self._time([(n, n, shape) for n in names], bar, tag, True, self._skip_big))
            bar.update()
        pool_timed = self._time_pool(variants, bar)
        memory: list[dict[str, dict]] = [{} for _ in plan]
        if not self.args.no_memory:
            for name in probe_names:
                idx = [i for i in first.values() if name in plan[i][4] and timed[i][name].status == "ok"]
                if idx:
                    for i, res in zip(idx, self._probe(name, [plan[i][3] for i in idx], bar)):
                        memory[i][name] = res
                else:
                    bar.update()
            for i, (*_, shape, names) in enumerate(plan):
                memory[i] = memory[first[(shape, tuple(names))]]
        pool_memory = self._probe_pool(variants, pool_timed, bar)
        bar.close()

        for sweep in sweeps:
            for v in variants:
                points = []
                for i, (sw, x, pv, shape, _) in enumerate(plan):
                    if sw is sweep and pv == v:
                        napo = pick_napo(timed[i], self.auto)
                        points.append(
                            {
                                "x": x,
                                "shape": shape.to_dict(),
                                "napo": napo,
                                "rows": make_rows(timed[i], memory[i], napo, shape.grad_bytes),
                            }
                        )
                base = rec_shape(self.quick).with_variant(v).describe()
                entry = {
                    "sweep": sweep.name,
                    "label": sweep.label,
                    "variant": v,
                    "base": base,
                    "points": points,
                }
                if not self.args.no_plots:
                    path = os.path.join(self.args.out, f"bench-{self.run_id}-scaling-{sweep.name}-{v}.png")
                    entry["plot"] = plot_sweep(entry, path)
                self.payload["scaling"].append(entry)
                print(_format_sweep(entry))
                print()
        self._report_pool(variants, pool_timed, pool_memory)

    def _pool_entries(self, v: str) -> list[tuple[str, str, Shape]]:
        own, shared = pool_bar_shapes(self.quick)
        return [("own", self.auto, own.with_variant(v)), ("all", self.auto, shared.with_variant(v))]

    def _time_pool(self, variants: list[str], bar) -> dict[str, dict[str, Timed]]:
        out = {}
        own, shared = pool_bar_shapes(self.quick)
        try:
            self.stage2_s = time_stage2(
                [own, shared], self.auto[5:], self.device, reps=5 if self.quick else 40
            )
        except Exception as exc:  # reported as missing, the step timings below still run
            print(f"stage-2 timing failed: {first_line(exc)}", file=sys.stderr)
            self.stage2_s = None
        for v in variants:
            # the 5% bar needs more runs than the sweeps to rise above the machine's noise
            out[v] = self._time(
                self._pool_entries(v),
                bar,
                f"pool 3->93 {v}",
                False,
                repeats=self.repeats if self.quick else max(self.repeats, 9),
            )
            bar.update()
        return out

    def _probe_pool(self, variants, pool_timed, bar) -> dict[str, dict[str, dict]]:
        out: dict[str, dict[str, dict]] = {v: {} for v in variants}
        if self.args.no_memory:
            return out
        jobs = [
            (v, key, shape)
            for v in variants
            for key, _, shape in self._pool_entries(v)
            if pool_timed[v][key].status == "ok"
        ]
        if jobs:
            for (v, key, _), res in zip(jobs, self._probe(self.auto, [s for *_, s in jobs], bar)):
                out[v][key] = res
        else:
            bar.update()
        return out

    def _report_pool(self, variants, pool_timed, pool_memory) -> None:
        for v in variants:
            entries = self._pool_entries(v)
            rows = make_rows(pool_timed[v], pool_memory[v], "own", entries[0][2].grad_bytes)
            for r, (_, _, shape) in zip(rows, entries):
                r["label"] = f"{self.auto} sharing={shape.sharing} ({shape.pool_per_prompt} negatives/prompt)"
                r["pool"] = shape.pool_per_prompt
            pool = {
                "variant": v,
                "describe": entries[1][2].describe(),
                "own": {
                    "pool": entries[0][2].pool_per_prompt,
                    "row": rows[0] if rows[0]["status"] == "ok" else None,
                },
                "all": {
                    "pool": entries[1][2].pool_per_prompt,
                    "row": rows[1] if rows[1]["status"] == "ok" else None,
                },
                "rows": rows,
                # each round ran 'own' then 'all' back to back: the median of the per-round ratios is
                # robust to slow drifts of the machine's load that a ratio of medians is not
                "paired_ratio": _paired_ratio(pool_timed[v]["all"].times_s, pool_timed[v]["own"].times_s),
                "stage2_ms": self.stage2_s and {"own": 1e3 * self.stage2_s[0], "all": 1e3 * self.stage2_s[1]},
            }
            if self.payload["pool"] is None or v == "frozen":
                self.payload["pool"] = pool  # the bar is judged on the frozen (LoRA) step when measured
            self.payload.setdefault("pool_all_variants", []).append(pool)
            print(
                format_table(f"pool sharing at equal forward work | {entries[1][2].describe()}", rows, None)
            )
            ratio = "-" if pool["paired_ratio"] is None else f"{pool['paired_ratio']:.3f}x"
            s2 = pool["stage2_ms"]
            alone = "not measured" if s2 is None else f"{s2['own']:.2f} ms own vs {s2['all']:.2f} ms all"
            print(f"paired time ratio all / own (median over rounds): {ratio}; stage 2 alone (the preference "
                  f"loss fwd+bwd on the scores): {alone}\n")  # fmt: skip

    # ------------------------------------------------------------------------------------------
    def _print_summary(self, judged: list[bars_mod.Bar]) -> None:
        rec = [t for t in self.payload["tables"] if t["case"] == "rec"]
        if rec:
            print("== core issue (rec): plain PyTorch (TRL-style) vs napo-kernels, same inputs, fwd + bwd")
        for t in rec:
            plain = next((r for r in t["rows"] if r["contender"] == "plain" and r["status"] == "ok"), None)
            if plain is None or t["napo"] is None:
                print(f"  {t['variant']}: not measured (plain or napo-kernels did not run)")
                continue
            mem = "-" if plain["mem_ratio"] is None else f"{plain['mem_ratio']:.1f}x"
            tim = "-" if plain["time_ratio"] is None else f"{plain['time_ratio']:.1f}x"
            beyond = "-" if plain["beyond_ratio"] is None else f"{plain['beyond_ratio']:.1f}x"
            print(
                f"  {t['variant']:9s} lm_head: {mem} less peak extra memory ({beyond} beyond the returned "
                f"gradients), {tim} less time\n            {t['napo']}: {t['napo_strategy']}"
            )
        print("\n== acceptance bars" + (" (QUICK shapes: figures are not meaningful)" if self.quick else ""))
        for b in judged:
            print("  " + b.line())
        if not judged:
            print("  (no bar applies to the cases run)")


def _load_text(payload: dict) -> str:
    load = payload["load_average"].get("start")
    return "unknown" if load is None else " / ".join(f"{x:.2f}" for x in load) + " (1 / 5 / 15 min)"


def _paired_ratio(num: list[float], den: list[float]) -> float | None:
    pairs = [a / b for a, b in zip(num, den) if b > 0]
    return statistics.median(pairs) if pairs else None


def _napo_strategy(shape: Shape, device: str, napo: str | None) -> tuple[int, str]:
    from .contenders import napo_strategy

    return napo_strategy(shape, device, (napo or "napo-cpp").removeprefix("napo-"))


def _format_sweep(entry: dict) -> str:
    """A compact sweep table: median ms and peak extra MiB per contender and point."""
    names: list[str] = []
    for p in entry["points"]:
        names += [r["contender"] for r in p["rows"] if r["contender"] not in names]
    head = f"{'':12s}" + "".join(f"{n:>22s}" for n in names)
    lines = [
        f"== scaling {entry['sweep']} ({entry['variant']}): {entry['label']}; ms | peak extra MiB",
        f"   around {entry['base']}",
        head,
    ]
    for p in entry["points"]:
        cells = []
        for n in names:
            r = next((r for r in p["rows"] if r["contender"] == n), None)
            if r is None or r["status"] != "ok":
                cells.append(f"{'n/a' if r is None else r['status']:>22s}")
                continue
            mem = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
            cells.append(f"{1e3 * r['median_s']:>12.1f} | {mem:>7s}")
        lines.append(f"{p['x']!s:>12s}" + "".join(cells))
    if entry.get("plot"):
        lines.append(f"plot: {entry['plot']}")
    return "\n".join(lines)
