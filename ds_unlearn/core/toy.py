"""Tiny models and random token data, for tests, benchmarks and examples.

Models are built from configs (never downloaded) and trained in seconds to memorize chosen
sequences to chosen degrees, so memorization metrics have known answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def tiny_config(
    arch: str = "llama", vocab_size: int = 64, hidden_size: int = 32, layers: int = 2, max_positions: int = 256
):
    """A 2-layer model config of the given architecture (``llama`` or ``gpt_neo``)."""
    from transformers import GPTNeoConfig, LlamaConfig

    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=max_positions,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            tie_word_embeddings=False,
        )
    if arch == "gpt_neo":
        return GPTNeoConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_layers=layers,
            num_heads=2,
            # GPT-Neo alternates global and windowed attention; a small window exercises both.
            attention_types=[[["global", "local"], layers // 2]],
            window_size=16,
            max_position_embeddings=max_positions,
            bos_token_id=0,
            eos_token_id=0,
        )
    raise ValueError(f"unknown arch {arch!r}")


def tiny_model(arch: str = "llama", seed: int = 0, **config_kwargs):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, **config_kwargs))


def random_sequences(
    count: int, length: int | Sequence[int], vocab_size: int, seed: int = 0, low: int = 1
) -> list[list[int]]:
    """``count`` i.i.d. uniform token sequences (ids in [low, vocab_size)); lengths may vary."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [length] * count if isinstance(length, int) else list(length)
    return [torch.randint(low, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def memorize(model, sequences: Sequence[Sequence[int]], steps: int = 150, lr: float = 1e-2):
    """Full-batch Adam on ``sequences`` until the model reproduces them (a few seconds)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        for seq in sequences:
            ids = torch.tensor([list(seq)])
            model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def save_model(model, path: str | Path) -> Path:
    path = Path(path)
    model.save_pretrained(path)
    return path
