"""Inference: prefill a batch of prompts, then greedy decoding with a per-layer KV cache.

The same function serves the single-device model and a sharded one (the model's collectives make
the tp ranks agree), so "distributed generation == single-process generation" compares one code
path with itself under different plans.
"""

from __future__ import annotations

from typing import Callable

import torch

from moeplan.runtime.model import GPT


@torch.no_grad()
def generate(model: GPT, prompt_BS: torch.Tensor, new_tokens: int,
             on_token: Callable[[int], None] | None = None) -> torch.Tensor:
    """Greedy continuation [B, new_tokens] of `prompt_BS`.

    `on_token(i)` is called after token i is produced (i = 0 is the prefill), for timers."""
    B, S = prompt_BS.shape
    if S + new_tokens > model.spec.max_seq_len:
        raise ValueError(f"prompt {S} + {new_tokens} new tokens exceed "
                         f"{model.spec.max_seq_len} positions")
    was_training = model.training
    model.eval()
    caches: list[dict] = [{} for _ in model.blocks]
    logits, _ = model(prompt_BS, caches, pos0=0)
    out = [logits[:, -1].argmax(-1)]
    if on_token:
        on_token(0)
    for i in range(1, new_tokens):
        logits, _ = model(out[-1][:, None], caches, pos0=S + i - 1)
        out.append(logits[:, -1].argmax(-1))
        if on_token:
            on_token(i)
    model.train(was_training)
    return torch.stack(out, dim=1)
