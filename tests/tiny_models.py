"""A tiny Llama built from a config (nothing is downloaded), shared by the training-side tests."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """Two layers, hidden size 32, grouped-query attention; the vocabulary of ``tokenizer``."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(cfg)
