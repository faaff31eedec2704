"""Negatives shared across ranks (``napo_kernels.distributed``) against one process holding the
concatenated global batch.

One ``gloo`` world per size (2 and 3 processes on 127.0.0.1) runs every case: seeded random shapes,
masks, uneven per-rank batches (the last rank smaller), each method and sharing mode, NAPO's margin
over several steps, a DDP-wrapped tiny policy through the fused ``napo_loss``, and the error cases.
Spawning costs seconds, so the cases are drawn once per world from a seeded generator rather than
by hypothesis (whose examples cannot be replayed identically inside several processes).

What is asserted, in float64 (bar: 1e-6; we use 1e-9):
- the mean over ranks of ``loss_r`` and the concatenated per-prompt ``rows`` equal the single
  process's loss and rows; NAPO's margin EMA equals the single process's after every step;
- every rank's score gradients equal ``W`` times the single-process gradients of those scores, so
- DDP's averaged parameter gradients equal the single-process parameter gradients.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from spawn_ranks import free_port, run_ranks

import napo_kernels as nk
from napo_kernels.distributed import all_gather_rows, data_parallel_group, preference_loss_across_ranks

TOL = dict(atol=1e-9, rtol=1e-9)
SPAWN_TIMEOUT_S = 120
TENSOR_KEYS = ("chosen", "rejected", "mask", "ref_chosen", "ref_rejected", "confidence", "users")


# ----------------------------------------------------------------------------------------------
# Cases: every rank's part of a global batch, and the options (identical on every rank).
# ----------------------------------------------------------------------------------------------


def _batch(g: torch.Generator, sizes: list[int], k: int, *, ref: bool, conf: bool, users: bool,
           mask_p: float, grid: bool = False) -> dict:  # fmt: skip
    n = sum(sizes)

    def draw(*shape: int) -> torch.Tensor:
        if grid:  # integer-valued scores: ties in DynamicPO's selection
            return torch.randint(-3, 1, shape, generator=g).double()
        return -3.0 * torch.rand(*shape, generator=g, dtype=torch.float64)

    mask = torch.rand(n, k, generator=g) > mask_p
    mask[:, 0] |= ~mask.any(1)  # every prompt keeps at least one negative (cases below break this on purpose)
    out = dict(chosen=draw(n), rejected=draw(n, k), mask=mask)
    if ref:
        out.update(ref_chosen=draw(n), ref_rejected=draw(n, k))
    if conf:
        out["confidence"] = torch.rand(n, k, generator=g, dtype=torch.float64)
    if users:
        out["users"] = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return out


def _cases(world: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def sizes() -> list[int]:  # uneven: the last rank holds a smaller batch
        full = [int(torch.randint(2, 5, (1,), generator=g)) for _ in range(world - 1)]
        return full + [int(torch.randint(1, min(full), (1,), generator=g))]

    specs = [
        # (method, sharing, K, options, batch options, steps)
        ("napo", "all", 3, dict(margin_mode="batch"), dict(ref=False, conf=False), 3),
        ("napo", "similarity", 3, dict(margin_mode="batch", rho=0.7), dict(ref=False, conf=True), 3),
        ("napo", "similarity", 2, dict(margin_mode="per_negative", rho=0.5), dict(ref=True, conf=True), 2),
        ("napo", "all", 2, dict(margin_mode="none", gamma0=0.5, beta=2.0), dict(ref=True, conf=False), 1),
        ("napo", "all", 3, dict(detach_negatives="shared"), dict(ref=False, conf=True), 2),
        ("napo", "all", 2, dict(detach_negatives="all"), dict(ref=False, conf=False), 1),
        ("napo", "own", 3, dict(), dict(ref=False, conf=True), 2),
        ("napo", "matrix", 2, dict(), dict(ref=False, conf=False), 1),
        ("s_dpo", "own", 3, dict(beta=0.5), dict(ref=True, conf=False), 1),
        ("s_dpo", "all", 2, dict(gamma=0.3), dict(ref=True, conf=False), 1),
        ("s_dpo", "similarity", 3, dict(rho=1.0), dict(ref=False, conf=False), 1),
        ("dmpo", "all", 3, dict(), dict(ref=True, conf=False), 1),
        ("dmpo", "own", 2, dict(), dict(ref=False, conf=False), 1),
        ("dynamicpo", "all", 3, dict(), dict(ref=True, conf=False), 1),
        ("dynamicpo", "similarity", 2, dict(tau=1.0), dict(ref=False, conf=False), 1),
        ("dynamicpo", "own", 3, dict(), dict(ref=True, conf=False), 1),
        ("dynamicpo", "all", 3, dict(), dict(ref=False, conf=False, grid=True), 1),
        ("dpo", "own", 1, dict(beta=0.1), dict(ref=True, conf=False), 1),
    ]
    cases = []
    for method, sharing, k, options, batch_opts, steps in specs:
        size = sizes()
        n = sum(size)
        case = dict(name=f"{method}/{sharing}/K{k}/{size}", method=method, sizes=size,
                    options=dict(options, backend="torch"), steps=[])  # fmt: skip
        for _ in range(steps):
            batch = _batch(g, size, k, users=sharing == "similarity", mask_p=0.3, **batch_opts)
            if sharing == "all":
                batch["mask"][0] = False  # a prompt with no negative of its own still has a shared pool
            case["steps"].append(batch)
        if sharing == "matrix":
            matrix = (torch.rand(n, n, generator=g) > 0.5) | torch.eye(n, dtype=torch.bool)
            case["options"]["sharing"] = matrix
        else:
            case["options"]["sharing"] = sharing
        cases.append(case)
    return cases


def _local(batch: dict, sizes: list[int], rank: int) -> dict:
    lo = sum(sizes[:rank])
    return {key: batch[key][lo : lo + sizes[rank]].clone() for key in TENSOR_KEYS if key in batch}


def _loss_inputs(part: dict) -> tuple[tuple, dict]:
    args = (part["chosen"], part["rejected"], part["mask"], part.get("ref_chosen"), part.get("ref_rejected"))
    return args, dict(confidence=part.get("confidence"), user_embeddings=part.get("users"))


def _margin(case: dict) -> nk.DynamicMargin | None:
    if case["method"] != "napo":
        return None
    options = case["options"]
    return nk.DynamicMargin(options.get("gamma0", 1.0), mode=options.get("margin_mode", "batch"))


def _options(case: dict) -> dict:
    return {k: v for k, v in case["options"].items() if k not in ("margin_mode", "gamma0")}  # in the state


# ----------------------------------------------------------------------------------------------
# The DDP check: a tiny fp64 policy through the fused napo_loss.
# ----------------------------------------------------------------------------------------------

VOCAB, HIDDEN, CANDIDATES, TOKENS = 11, 6, 4, 3


class TinyPolicy(torch.nn.Module):
    """Token embedding -> tanh(linear) hidden states; the lm_head weight is passed to napo_loss."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.body = torch.nn.Linear(HIDDEN, HIDDEN)
        self.lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(self.embed(tokens)))


def _policy_batch(sizes: list[int], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    tokens = torch.randint(0, VOCAB, (n, CANDIDATES, TOKENS), generator=g)
    labels = torch.randint(0, VOCAB, (n, CANDIDATES, TOKENS), generator=g)
    labels[:, :, 0] = -100  # prompt positions are not scored
    candidates = torch.ones(n, CANDIDATES, dtype=torch.bool)
    candidates[-1, -1] = False  # the last prompt has one negative fewer
    return dict(tokens=tokens, labels=labels, candidates=candidates,
                users=torch.randn(n, 4, generator=g, dtype=torch.float64))  # fmt: skip


def _policy_step(model, module, batch: dict, margin, group) -> tuple[torch.Tensor, dict]:
    module.zero_grad(set_to_none=True)
    out = nk.napo_loss(
        model(batch["tokens"]), module.lm_head.weight, batch["labels"], candidate_mask=batch["candidates"],
        method="napo", sharing="similarity", user_embeddings=batch["users"], margin_state=margin,
        backend="torch", process_group=group, return_outputs=True,
    )  # fmt: skip
    out.loss.backward()
    return out.loss.detach(), {name: p.grad.clone() for name, p in module.named_parameters()}


# ----------------------------------------------------------------------------------------------
# Errors: per-rank deviations from a valid call. Every rank must raise (none may hang).
# ----------------------------------------------------------------------------------------------


def _error_cases(world: int) -> list[tuple[str, Callable]]:
    def base(rank: int, k: int = 2, dtype=torch.float64, b: int | None = None, grad: bool = True) -> dict:
        b = b if b is not None else 3 - (rank == world - 1)
        g = torch.Generator().manual_seed(rank)
        return dict(chosen=torch.randn(b, generator=g, dtype=dtype).requires_grad_(grad),
                    rejected=torch.randn(b, k, generator=g, dtype=dtype).requires_grad_(grad))  # fmt: skip

    last = world - 1

    def call(rank, inputs, **options):
        return nk.preference_loss(inputs["chosen"], inputs["rejected"], inputs.get("mask"),
                                  process_group=dist.group.WORLD, backend="torch", return_outputs=True,
                                  **{"method": "s_dpo", "sharing": "all", **options})  # fmt: skip

    def k_differs(rank):
        return call(rank, base(rank, k=3 if rank == last else 2))

    def dtype_differs(rank):
        return call(rank, base(rank, dtype=torch.float32 if rank == last else torch.float64))

    def sharing_differs(rank):
        return call(rank, base(rank), sharing="own" if rank == last else "all")

    def method_differs(rank):
        return call(rank, base(rank), method="dmpo" if rank == last else "s_dpo")

    def beta_differs(rank):
        return call(rank, base(rank), beta=2.0 if rank == last else 1.0)

    def ema_differs(rank):
        margin = nk.DynamicMargin()
        if rank == last:
            margin.ema.fill_(0.25)  # e.g. a rank restored from another checkpoint
        return call(rank, base(rank), method="napo", margin_state=margin)

    def confidence_differs(rank):
        inputs = base(rank)
        confidence = None if rank == last else torch.rand_like(inputs["rejected"]).detach()
        return call(rank, inputs, method="napo", confidence=confidence, margin_state=nk.DynamicMargin())

    def grad_differs(rank):
        return call(rank, base(rank, grad=rank != last))

    def bad_mask_on_one_rank(rank):
        inputs = base(rank)
        inputs["mask"] = torch.ones(inputs["rejected"].shape[0], 5 if rank == last else 2, dtype=torch.bool)
        return call(rank, inputs)

    def empty_own_pool(rank):
        inputs = base(rank)
        inputs["mask"] = torch.ones_like(inputs["rejected"], dtype=torch.bool)
        if rank == last:
            inputs["mask"][1] = False
        return call(rank, inputs, sharing="own")

    def empty_global_pool(rank):
        inputs = base(rank)
        inputs["mask"] = torch.zeros_like(inputs["rejected"], dtype=torch.bool)
        return call(rank, inputs)

    def matrix_wrong_size(rank):
        inputs = base(rank)
        return call(rank, inputs, method="napo", sharing=torch.ones(2, 2, dtype=torch.bool))  # G > 2

    return [
        ("K (negatives per prompt)", k_differs),
        ("score dtype", dtype_differs),
        ("sharing", sharing_differs),
        ("method", method_differs),
        ("beta", beta_differs),
        ("margin EMA", ema_differs),
        ("confidence given", confidence_differs),
        ("rejected_logps requires grad", grad_differs),
        ("negative_mask must have shape", bad_mask_on_one_rank),
        ("empty negative pool", empty_own_pool),
        ("empty negative pool", empty_global_pool),
        ("[G, G]", matrix_wrong_size),
    ]


# ----------------------------------------------------------------------------------------------
# The worker: one process of the world; writes its results for the parent to compare.
# ----------------------------------------------------------------------------------------------


def _worker(rank: int, world: int, port: int, spec_path: str, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        results = _run_rank(rank, world, torch.load(spec_path))
    except BaseException:
        results = {"crash": traceback.format_exc()}
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _run_rank(rank: int, world: int, spec: dict) -> dict:
    t0 = time.perf_counter()
    group = dist.group.WORLD
    results: dict = {"cases": [], "errors": []}
    for case in spec["cases"]:
        margin = _margin(case)
        steps = []
        for batch in case["steps"]:
            part = _local(batch, case["sizes"], rank)
            part["chosen"].requires_grad_(True)
            part["rejected"].requires_grad_(True)
            args, kwargs = _loss_inputs(part)
            out = nk.preference_loss(*args, **kwargs, **_options(case), margin_state=margin,
                                     method=case["method"], process_group=group,
                                     return_outputs=True)  # fmt: skip
            out.loss.backward()
            steps.append(dict(loss=out.loss.detach(), rows=out.rows.detach(), d_chosen=part["chosen"].grad,
                              d_rejected=part["rejected"].grad,
                              ema=None if margin is None else margin.ema.clone()))  # fmt: skip
        results["cases"].append(steps)

    # the differentiable gather on its own: uneven rows, gradient = sum over ranks of each row's
    sizes = spec["cases"][0]["sizes"]
    x = (torch.arange(sizes[rank] * 2, dtype=torch.float64).reshape(-1, 2) + 100 * rank).requires_grad_(True)
    gathered = all_gather_rows(x, group)
    (gathered * torch.arange(gathered.numel(), dtype=torch.float64).reshape(gathered.shape)).sum().backward()
    results["gather"] = dict(value=gathered.detach(), grad=x.grad)

    # DDP over a tiny policy: the averaged parameter gradients
    torch.manual_seed(0)
    module = TinyPolicy().double()
    model = torch.nn.parallel.DistributedDataParallel(module)
    batch = _policy_batch(spec["policy_sizes"], spec["seed"])
    lo, n = sum(spec["policy_sizes"][:rank]), spec["policy_sizes"][rank]
    local = {key: value[lo : lo + n] for key, value in batch.items()}
    margin = nk.DynamicMargin()
    results["ddp"] = [_policy_step(model, module, local, margin, group) for _ in range(2)]
    results["ddp_ema"] = margin.ema.clone()

    for expected, fn in _error_cases(world):
        try:
            fn(rank)
            results["errors"].append((expected, None, ""))
        except (ValueError, TypeError) as exc:
            results["errors"].append((expected, type(exc).__name__, str(exc)))
    # the group is still in step after every error: a valid call goes through
    after = nk.preference_loss(torch.zeros(2), torch.zeros(2, 2), method="s_dpo", sharing="all",
                               process_group=group, backend="torch", return_outputs=True)  # fmt: skip
    results["after_errors"] = after.loss.item()
    print(f"rank {rank}: cases {time.perf_counter() - t0:.2f} s", flush=True)
    return results


def _spawn(world: int, spec: dict, tmp_path) -> list[dict]:
    spec_path = str(tmp_path / "spec.pt")
    torch.save(spec, spec_path)
    # forkserver: torch and the custom-op machinery are imported once in the server, not in every rank
    mp.set_forkserver_preload(["torch", "torch._dynamo", "napo_kernels", "napo_kernels.distributed"])
    args = (world, free_port(), spec_path, str(tmp_path))
    return run_ranks(_worker, world, args, tmp_path, SPAWN_TIMEOUT_S, f"{world}-process world")


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def world(request, tmp_path_factory):
    size = request.param
    seed = 1000 + size
    policy_sizes = [3] * (size - 1) + [2]  # uneven last batch
    spec = dict(cases=_cases(size, seed), seed=seed, policy_sizes=policy_sizes)
    results = _spawn(size, spec, tmp_path_factory.mktemp(f"world{size}"))
    return size, spec, results


# ----------------------------------------------------------------------------------------------
# The single-process computation over the concatenated batch.
# ----------------------------------------------------------------------------------------------


def _single(case: dict) -> list[dict]:
    margin = _margin(case)
    out_steps = []
    for batch in case["steps"]:
        full = {key: batch[key].clone() for key in TENSOR_KEYS if key in batch}
        full["chosen"].requires_grad_(True)
        full["rejected"].requires_grad_(True)
        args, kwargs = _loss_inputs(full)
        options = dict(_options(case), method=case["method"], margin_state=margin)
        out = nk.preference_loss(*args, **kwargs, **options, return_outputs=True)
        out.loss.backward()
        out_steps.append(dict(loss=out.loss.detach(), rows=out.rows.detach(), d_chosen=full["chosen"].grad,
                              d_rejected=full["rejected"].grad,
                              ema=None if margin is None else margin.ema.clone()))  # fmt: skip
    return out_steps


@pytest.mark.slow  # the `world` fixture spawns 2 and 3 processes
def test_loss_and_gradients_match_one_process(world):
    size, spec, results = world
    for c, case in enumerate(spec["cases"]):
        sizes = case["sizes"]
        assert sizes[-1] < max(sizes), "each case must have an uneven last batch"
        for step, single in enumerate(_single(case)):
            ranks = [res["cases"][c][step] for res in results]
            where = f"{case['name']} step {step}"
            losses = torch.stack([r["loss"] for r in ranks])
            torch.testing.assert_close(losses.mean(), single["loss"], **TOL, msg=f"{where}: loss")
            torch.testing.assert_close(torch.cat([r["rows"] for r in ranks]), single["rows"], **TOL,
                                       msg=f"{where}: rows")  # fmt: skip
            for key in ("d_chosen", "d_rejected"):
                got = torch.cat([r[key] for r in ranks]) / size  # what DDP's averaging divides by
                torch.testing.assert_close(got, single[key], **TOL, msg=f"{where}: {key}")
            if single["ema"] is not None:
                for r in ranks:
                    torch.testing.assert_close(r["ema"], single["ema"], **TOL, msg=f"{where}: margin EMA")


@pytest.mark.slow  # the `world` fixture spawns 2 and 3 processes
def test_shared_negatives_receive_gradient_from_other_ranks(world):
    """Guard against a no_grad gather (NAPO's released code): with sharing='all' every valid negative
    gets a nonzero gradient, including from rows on other ranks."""
    size, spec, results = world
    c = next(i for i, case in enumerate(spec["cases"]) if case["name"].startswith("napo/all/K3"))
    mask = spec["cases"][c]["steps"][0]["mask"]
    grads = torch.cat([res["cases"][c][0]["d_rejected"] for res in results])
    assert bool((grads[mask] != 0).all())
    assert bool((grads[~mask] == 0).all())


@pytest.mark.slow  # the `world` fixture spawns 2 and 3 processes
def test_all_gather_rows_uneven(world):
    size, spec, results = world
    sizes = spec["cases"][0]["sizes"]
    parts = [torch.arange(n * 2, dtype=torch.float64).reshape(-1, 2) + 100 * r for r, n in enumerate(sizes)]
    expected = torch.cat(parts)
    weights = torch.arange(expected.numel(), dtype=torch.float64).reshape(expected.shape)
    lo = 0
    for r, res in enumerate(results):
        torch.testing.assert_close(res["gather"]["value"], expected)
        # every rank's loss uses every row: the owner receives the sum over ranks of the gradient
        torch.testing.assert_close(res["gather"]["grad"], size * weights[lo : lo + sizes[r]])
        lo += sizes[r]


@pytest.mark.slow  # the `world` fixture spawns 2 and 3 processes
def test_ddp_parameter_gradients_match_one_process(world):
    size, spec, results = world
    torch.manual_seed(0)
    module = TinyPolicy().double()
    batch = _policy_batch(spec["policy_sizes"], spec["seed"])
    margin = nk.DynamicMargin()
    single = [_policy_step(module, module, batch, margin, None) for _ in range(2)]
    for step, (loss, grads) in enumerate(single):
        losses = torch.stack([res["ddp"][step][0] for res in results])
        torch.testing.assert_close(losses.mean(), loss, **TOL, msg=f"step {step}: loss")
        for res in results:  # DDP leaves the same averaged gradient on every rank
            for name, grad in grads.items():
                torch.testing.assert_close(res["ddp"][step][1][name], grad, **TOL, msg=f"step {step}: {name}")
    for res in results:
        torch.testing.assert_close(res["ddp_ema"], margin.ema, **TOL)


@pytest.mark.slow  # the `world` fixture spawns 2 and 3 processes
def test_mismatches_raise_on_every_rank(world):
    size, spec, results = world
    for case in range(len(results[0]["errors"])):
        outcomes = [res["errors"][case] for res in results]
        expected = outcomes[0][0]
        for r, (_, kind, message) in enumerate(outcomes):
            assert kind == "ValueError", f"{expected}: rank {r} raised {kind}: {message}"
            local = "rejected its own inputs" in message
            assert expected in message or local, f"{expected}: rank {r} said {message!r}"
        assert any(expected in message for _, _, message in outcomes)
    # after all those errors the ranks are still in step
    assert all(res["after_errors"] == results[0]["after_errors"] for res in results)


# ----------------------------------------------------------------------------------------------
# Without a world.
# ----------------------------------------------------------------------------------------------


def test_process_group_needs_initialised_distributed():
    assert not dist.is_initialized()
    assert data_parallel_group() is None
    with pytest.raises(RuntimeError, match="not initialised"):
        nk.preference_loss(
            torch.zeros(2), torch.zeros(2, 2), method="s_dpo", process_group=object(), return_outputs=True
        )
    with pytest.raises(RuntimeError, match="not initialised"):
        preference_loss_across_ranks(
            torch.zeros(2),
            torch.zeros(2, 2),
            process_group=object(),
            config=nk.LossConfig("s_dpo"),
            margin=None,
        )
