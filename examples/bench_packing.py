"""Training-step time: packed candidates (one forward per prompt) vs separate sequences.

A tiny Llama (4 layers, H = 256) scores prompts of 150 tokens with 1 + K answers of 4-8 tokens;
one step = forward, fused S-DPO loss (reference-free) and backward. Both layouts give the same
loss (checked); the script prints the median step time of each and the speed-up.

    python examples/bench_packing.py                 # K = 3 and K = 19, full fine-tuning
    python examples/bench_packing.py --k 3 --lora    # LoRA adapters: frozen lm_head (the fast path)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import napo_kernels as nk
from napo_kernels.recommender.packing import (
    candidate_rows,
    causal_lm_parts,
    pack_candidates,
    separate_candidates,
)


def make_problem(batch: int, k: int, prompt_len: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    answers = [
        [
            torch.randint(3, vocab, (int(torch.randint(4, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(k + 1)
        ]
        for _ in range(batch)
    ]
    return prompts, answers


def step(model, batch, method: str) -> tuple[float, float]:
    """One training step (forward + loss + backward); returns (seconds, loss)."""
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    rows = candidate_rows(model, batch)
    _, head = causal_lm_parts(model)
    b, c = batch["candidate_mask"].shape
    loss = nk.napo_loss(
        rows,
        head.weight,
        batch["score_labels"],
        sequence_ids=batch["score_sequence"],
        num_prompts=b,
        num_candidates=c,
        candidate_mask=batch["candidate_mask"],
        method=method,
    )
    loss.backward()
    return time.perf_counter() - t0, float(loss.detach())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, nargs="+", default=[3, 19], help="negatives per prompt")
    p.add_argument("--batch", type=int, default=2, help="prompts per step")
    p.add_argument("--prompt-len", type=int, default=150)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=5, help="timed steps per layout (after one warm-up)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters only (frozen lm_head)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        )
    model.train()
    mode = "LoRA" if args.lora else "full fine-tuning"
    print(
        f"tiny Llama 4 layers H=256 V={args.vocab}, {args.batch} prompts x {args.prompt_len} tokens, "
        f"answers 4-8 tokens, {mode}, {torch.get_num_threads()} threads"
    )
    results = {}
    for k in args.k:
        prompts, answers = make_problem(args.batch, k, args.prompt_len, args.vocab, seed=k)
        method = "dpo" if k == 1 else "s_dpo"
        batches = {
            "packed": pack_candidates(prompts, answers, 0),
            "separate": separate_candidates(prompts, answers, 0),
        }
        tokens = {name: b["input_ids"].numel() for name, b in batches.items()}
        times: dict[str, list[float]] = {name: [] for name in batches}
        losses: dict[str, float] = {}
        for batch in batches.values():
            step(model, batch, method)  # warm-up
        for _ in range(args.steps):  # interleaved, so that a busy machine slows both layouts alike
            for name, batch in batches.items():
                seconds, losses[name] = step(model, batch, method)
                times[name].append(seconds)
        timing = {name: statistics.median(t) for name, t in times.items()}
        if abs(losses["packed"] - losses["separate"]) > 1e-4 * max(1.0, abs(losses["separate"])):
            raise SystemExit(f"K={k}: the layouts disagree: loss {losses['packed']} vs {losses['separate']}")
        speedup = timing["separate"] / timing["packed"]
        results[k] = {
            "packed_s": timing["packed"],
            "separate_s": timing["separate"],
            "speedup": speedup,
            "loss": losses["packed"],
            "tokens": tokens,
        }
        print(
            f"K={k:>2}: packed {timing['packed'] * 1e3:8.1f} ms ({tokens['packed']} positions)  "
            f"separate {timing['separate'] * 1e3:8.1f} ms ({tokens['separate']} positions)  "
            f"speed-up {speedup:5.2f}x  loss {losses['packed']:.6f} == {losses['separate']:.6f}"
        )
    return results


if __name__ == "__main__":
    main()
