"""The fused path never allocates more than one ``[chunk, V]`` block of logits.

Every allocation the torch CPU allocator makes during forward + backward is read from the torch
profiler (``profile_memory=True``: one event per allocation with its size), for the trainable and
the frozen ``lm_head`` backward. The largest single allocation must fit one fp32 ``[chunk, V]``
block, while the plain implementation (``hidden @ W.T`` then ``log_softmax``) needs a whole
``[rows, V]`` tensor: the same measurement fails for it, so the test can fail.
"""

from __future__ import annotations

import pytest
import torch
from torch._C._profiler import _EventType  # the allocation records of the profiler's event tree
from torch.profiler import ProfilerActivity, profile

import napo_kernels as nk

pytestmark = pytest.mark.filterwarnings("ignore:napo. no margin_state:UserWarning")

B, C, T, H, V = 4, 8, 8, 8, 2000  # 256 scored rows; H << chunk so weight-sized buffers stay below a block
CHUNK = 16
BLOCK = CHUNK * V * 4  # bytes of one fp32 [chunk, V] logits block
FULL = B * C * T * V * 4  # bytes of the whole fp32 logits tensor


def allocations(fn) -> tuple[int, int]:
    """``(largest single allocation, peak growth of live bytes)`` while ``fn`` runs, in bytes."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = []  # (time, bytes allocated (negative: freed), live bytes after it)
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            fields = event.extra_fields
            records.append((event.start_time_ns, fields.alloc_size, fields.total_allocated))
        stack.extend(event.children)
    assert records, "the profiler recorded no allocation: the measurement itself is broken"
    records.sort()
    baseline = records[0][2] - records[0][1]
    return max(r[1] for r in records), max(r[2] for r in records) - baseline


def problem(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, C, T, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) / H**0.5).to(dtype)
    labels = torch.randint(0, V, (B, C, T), generator=gen)
    return hidden, weight, labels


def skip_interpreter(backend: str) -> None:
    if backend == "triton":
        pytest.skip(
            "the Triton interpreter computes through numpy: its buffers never reach the torch allocator"
        )


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("limit_by", ["chunk_size", "memory_budget"])
def test_fused_step_allocates_at_most_one_chunk(backend, frozen, limit_by):
    skip_interpreter(backend)
    hidden, weight, labels = problem(torch.float32)
    limit = {"chunk_size": dict(chunk_size=CHUNK), "memory_budget": dict(memory_budget=BLOCK)}[limit_by]

    def step():
        x = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(not frozen)
        loss = nk.napo_loss(x, w, labels, method="napo", sharing="all", backend=backend, **limit)
        loss.backward()
        assert x.grad is not None and (w.grad is None) == frozen

    largest, peak = allocations(step)
    assert largest <= BLOCK, f"largest allocation {largest} B > one [chunk, V] fp32 block ({BLOCK} B)"
    assert peak < FULL, f"peak growth {peak} B is not below one full logits tensor ({FULL} B)"


def test_low_precision_allocations_do_not_grow_with_rows(backend):
    """bf16 inputs: the CPU BLAS converts bf16 GEMM operands into its own scratch (about two fp32
    chunk blocks), so the bound is stated per chunk: the largest allocation is the same for 256 and
    for 512 rows, and far below one full logits tensor."""
    skip_interpreter(backend)
    hidden, weight, labels = problem(torch.bfloat16)
    largest = []
    for repeat in (1, 2):
        x0, y = hidden.repeat(repeat, 1, 1, 1), labels.repeat(repeat, 1, 1)

        def step(x0=x0, y=y):
            x = x0.clone().requires_grad_(True)
            w = weight.clone().requires_grad_(True)
            nk.sequence_logprobs(x, w, y, chunk_size=CHUNK, backend=backend).sum().backward()

        largest.append(allocations(step)[0])
    assert largest[0] == largest[1], f"largest allocation grows with the rows: {largest}"
    assert largest[0] <= 3 * BLOCK < FULL


def test_cpu_kernel_works_in_the_block_it_reports(monkeypatch):
    """The C++ CPU kernel reshapes the ``[chunk, V]`` budget into vocabulary tiles; the largest
    allocation of its forward is exactly the block ``cpu_block_shape`` reports (the benchmark's
    description of the strategy relies on it), and within the budget."""
    cpp = pytest.importorskip("napo_kernels.kernels.extension", reason="C++ extension not built")
    hidden, weight, labels = problem(torch.float32)
    rows = hidden.shape[:3].numel()
    targets = labels.reshape(-1)
    for tile, chunk in ((None, 1), (None, 5), (None, CHUNK), (None, 300), ("64", 7), ("4096", 3)):
        monkeypatch.delenv("NAPO_KERNELS_CPU_VOCAB_TILE", raising=False)
        if tile is not None:  # the mirror follows the kernel's override (4096: one tile, untiled loop)
            monkeypatch.setenv("NAPO_KERNELS_CPU_VOCAB_TILE", tile)
        block_rows, width = cpp.cpu_block_shape(rows, V, chunk)
        largest, _ = allocations(
            lambda c=chunk: cpp.linear_logprobs_fwd(hidden.reshape(rows, H), weight, None, targets, c, False)
        )
        assert largest == block_rows * width * 4 <= min(chunk, rows) * V * 4, (
            chunk,
            largest,
            block_rows,
            width,
        )


def test_plain_logits_exceed_the_bound():
    """The control: materialising the logits allocates ``[rows, V]`` at once, so the bound above is
    a real constraint (a fused path that fell back to plain logits would fail it)."""
    hidden, weight, labels = problem(torch.float32)

    def step():
        x = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        logp = torch.log_softmax(x @ w.T, -1).gather(-1, labels[..., None])
        logp.sum().backward()

    largest, peak = allocations(step)
    assert largest >= FULL > BLOCK
    assert peak >= FULL


def test_chunk_size_from_memory_budget():
    """``choose_chunk_size`` turns a byte budget into rows of one fp32 ``[chunk, V]`` block."""
    cpu = torch.device("cpu")
    assert nk.choose_chunk_size(10_000, V, cpu, BLOCK) == CHUNK
    assert nk.choose_chunk_size(10_000, V, cpu, BLOCK - 1) == CHUNK - 1  # below 16 rows: not tile-rounded
    assert nk.choose_chunk_size(10_000, V, cpu, 35 * V * 4) == 32  # whole tiles of 16 rows
    assert nk.choose_chunk_size(5, V, cpu, BLOCK) == 5  # never more than the rows
    assert nk.choose_chunk_size(10_000, V, cpu, 1) == 1  # at least one row


def test_kept_logits_cost_no_memory(monkeypatch):
    """A trainable head on the cpp backend keeps its 32 x 2000 logits (250 KiB, eight [16, V]-budget
    blocks' worth of rows) in the memory of the weight gradient, allocated by the forward instead of
    the backward: the step's peak growth is within one budget block of the peak with the logits
    recomputed (NAPO_KERNELS_KEEP_LOGITS=0; measured: 10 KiB more, the forward's partial E of a
    second vocabulary group while the gradient exists), and no allocation is larger than the
    gradient or one block."""
    pytest.importorskip("napo_kernels.kernels.extension", reason="C++ extension not built")
    from napo_kernels.ops.linear_logprobs import keeps_logits

    gen = torch.Generator().manual_seed(0)
    h, chunk = 64, 16  # 32 scored rows <= H
    hidden = torch.randn(2, 2, 8, h, generator=gen)
    weight = torch.randn(V, h, generator=gen) / h**0.5
    labels = torch.randint(0, V, (2, 2, 8), generator=gen)
    peaks = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("NAPO_KERNELS_KEEP_LOGITS", flag)
        assert keeps_logits("cpp", 32, weight, chunk) == (flag == "1")

        def step():
            x, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
            nk.napo_loss(
                x, w, labels, method="napo", sharing="all", backend="cpp", chunk_size=chunk
            ).backward()

        largest, peaks[flag] = allocations(step)
        assert largest <= max(V * h * 4, chunk * V * 4), (flag, largest)
    assert peaks["1"] <= peaks["0"] + chunk * V * 4, peaks
