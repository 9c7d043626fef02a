"""Inference: prefill a batch of prompts, then greedy decoding on a static KV cache.

Legend: B batch, S prompt length, M cache positions (S + new tokens).

The cache is allocated once per generation for all M positions. A decode step reads the last
token and its position from two device buffers that it advances in place, so every step has the
same shapes and reads nothing back to the host; on CUDA one step is captured in a CUDA graph
after `WARMUP_STEPS` eager ones and replayed for every following token.

The same function serves the single-device model and a sharded one (the model's collectives make
the tp ranks agree), so "distributed generation == single-process generation" compares one code
path with itself under different plans.
"""

from __future__ import annotations

from typing import Callable

import torch

from moeplan.runtime.model import GPT, KVCache

# eager decode steps before the capture (CUDA graphs want the allocator and lazy inits settled)
WARMUP_STEPS = 2


class Decoder:
    """Greedy decode steps on static buffers: `tok_B` (the last token) and `pos_1` (its
    position) in, the next token out; `advance` moves both on."""

    def __init__(self, model: GPT, cache: KVCache, tok_B: torch.Tensor, pos: int):
        self.model, self.cache = model, cache
        self.tok_B = tok_B.clone()
        self.pos_1 = torch.full((1,), pos, dtype=torch.long, device=tok_B.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out_B: torch.Tensor | None = None

    def eager(self) -> torch.Tensor:
        logits, _ = self.model(self.tok_B[:, None], self.cache, self.pos_1)
        return logits[:, -1].argmax(-1)

    def capture(self) -> None:
        """Record one step; replays then read and write the same buffers."""
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out_B = self.eager()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.out_B.clone()  # the next replay overwrites out_B

    def advance(self, tok_B: torch.Tensor) -> None:
        self.tok_B.copy_(tok_B)
        self.pos_1.add_(1)


@torch.no_grad()
def generate(model: GPT, prompt_BS: torch.Tensor, new_tokens: int,
             on_token: Callable[[int], None] | None = None,
             graph: bool | None = None) -> torch.Tensor:
    """Greedy continuation [B, new_tokens] of `prompt_BS`.

    `on_token(i)` is called after token i is produced (i = 0 is the prefill), for timers.
    `graph`: replay decode steps from a CUDA graph (default: on CUDA, unless the routing is
    dropless — its buffers are sized to each step's busiest expert, read back to the host)."""
    B, S = prompt_BS.shape
    if S + new_tokens > model.spec.max_seq_len:
        raise ValueError(f"prompt {S} + {new_tokens} new tokens exceed "
                         f"{model.spec.max_seq_len} positions")
    dropless = not model.spec.drop_tokens and any(model.spec.experts)
    if graph and dropless:
        raise ValueError("dropless routing sizes its buffers every step: no CUDA graph")
    use_graph = (prompt_BS.is_cuda and not dropless) if graph is None else graph
    was_training = model.training
    model.eval()
    cache = model.new_cache(B, S + new_tokens)
    logits, _ = model(prompt_BS, cache)
    out = [logits[:, -1].argmax(-1)]
    if on_token:
        on_token(0)
    step = Decoder(model, cache, out[0], S)
    for i in range(1, new_tokens):
        if use_graph and i == WARMUP_STEPS + 1:
            step.capture()
        tok_B = step.replay() if step.graph is not None else step.eager()
        step.advance(tok_B)
        out.append(tok_B)
        if on_token:
            on_token(i)
    model.train(was_training)
    return torch.stack(out, dim=1)
