"""Triton gating / dispatch / combine == the torch reference, under TRITON_INTERPRET=1 on CPU.

Values, routing tables, dropped counts and gradients, on the edge cases that break such kernels:
an expert that receives no token, every token on one expert, capacity below demand, top-2 up to
top-8 (today's fine-grained models), the chosen probabilities unnormalised, padding tokens
(TP-coordinated gating), odd hidden sizes, no tokens at all; and the whole model with either
implementation.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from tolerance import assert_rounding_close, gpt_chain, magnitude, rounding_atol  # noqa: E402

from moeplan.runtime import gating  # noqa: E402
from moeplan.runtime.kernels import REFERENCE, select, triton_kernels, use_kernels  # noqa: E402

TRITON = triton_kernels()


VIEWS = {"view", "_unsafe_view", "unsqueeze", "expand", "slice", "select", "detach", "transpose",
         "t", "alias", "as_strided", "squeeze", "permute", "unbind", "split"}


def count_ops(call, monkeypatch) -> tuple[int, object]:
    """Framework operations of `call` on the Triton path: torch ops (views excluded) plus
    kernel launches, every kernel replaced by a stub that only counts its launch (under the
    interpreter a kernel's own host copies would count too)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from moeplan.runtime.kernels import triton_moe

    n = [0]

    class Launch:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                n[0] += 1
            return launch

    with monkeypatch.context() as m:
        for name in ("_softmax_topk", "_slots", "_gate_infer", "_expert_linear",
                     "_scatter_rows", "_gather_rows"):
            m.setattr(triton_moe, name, Launch())

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                n[0] += func.overloadpacket.__name__ not in VIEWS
                return func(*args, **(kwargs or {}))

        with Count():
            out = call()
    return n[0], out


def logits_for(case: str, T: int, E: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(T, E, generator=g)
    if case.startswith("one expert"):
        x[:, 3 % E] += 20.0  # every first choice on one expert
    if case.startswith("empty expert"):
        x[:, 0] -= 20.0  # expert 0 gets nothing
    return x


CASES = [  # (case, T, E, k, capacity, hidden, padded tokens, renormalise)
    ("uniform", 37, 8, 1, 6, 13, 0, True),
    ("uniform top-2", 64, 4, 2, 40, 32, 0, True),
    ("capacity below demand", 50, 4, 2, 3, 7, 0, True),
    ("one expert", 40, 8, 1, 5, 9, 0, True),
    ("one expert top-2", 40, 8, 2, 5, 9, 0, True),
    ("empty expert", 33, 4, 1, 16, 31, 0, True),
    ("padding (coordinated)", 30, 8, 2, 6, 17, 7, True),
    ("no tokens", 0, 4, 2, 4, 8, 0, True),
    ("top-4 capacity below demand", 45, 8, 4, 9, 11, 0, True),
    ("top-8 of 16, padding", 29, 16, 8, 15, 10, 5, True),
    ("top-6 raw weights", 40, 12, 6, 30, 9, 0, False),
    ("empty expert top-3", 26, 6, 3, 20, 5, 0, True),
]


@pytest.mark.parametrize("case, T, E, k, cap, H, pad, norm", CASES, ids=[c[0] for c in CASES])
def test_triton_equals_reference(case, T, E, k, cap, H, pad, norm):
    g = torch.Generator().manual_seed(hash(case) % 1000)
    logits = logits_for(case, T, E, g).requires_grad_()
    valid = torch.arange(T) < T - pad
    x = torch.randn(T, H, generator=g, requires_grad=True)
    y = torch.randn(E, cap, H, generator=g, requires_grad=True)
    dy = torch.randn(T, H, generator=g)
    outs = {}
    for impl in (REFERENCE, TRITON):
        r = impl.gate(logits, k, cap, valid, renormalize=norm)
        buf = impl.dispatch(x, r, E)
        out = impl.combine(y, r)
        loss = (out * dy).sum() + r.aux_loss + (buf * buf).sum()
        # the reference also gives the combine weights' gradient, which bounds the terms of the
        # softmax backward (they cancel: the logits' gradient is far smaller than its terms)
        wrt = [x, y, logits] + ([r.weight_TK] if impl is REFERENCE else [])
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        outs[impl.name] = (r, buf, out, grads)
    (ra, ba, oa, (*ga, g_weight)), (rb, bb, ob, gb) = outs["torch"], outs["triton"]
    assert torch.equal(ra.expert_TK, rb.expert_TK)
    assert torch.equal(ra.keep_TK, rb.keep_TK)
    assert torch.equal(ra.slot_TK[ra.keep_TK], rb.slot_TK[rb.keep_TK])
    assert ra.dropped == rb.dropped and ra.routed == rb.routed
    # reductions: softmax over E, the aux loss's means over T, the combine's k rows, and in the
    # backward the combine weights' dot products over H
    assert_rounding_close(rb.weight_TK, ra.weight_TK, chain=E)
    assert_rounding_close(rb.aux_loss, ra.aux_loss, chain=T + E)
    assert torch.equal(ba, bb)  # pure data movement: bit for bit
    assert_rounding_close(ob, oa, chain=E + k)  # the weights carry their softmax's rounding
    # softmax backward p·(g − Σ p·g): its terms are at most 2·max|g|, g the combine weights'
    # gradient plus the aux loss's E·mean(mask)/T
    terms = {0: None, 1: None, 2: 2 * (magnitude(g_weight) + E / max(T, 1))}
    for i, (p, q) in enumerate(zip(ga, gb)):
        assert_rounding_close(q, p, chain=T + E + 2 * k + H, scale=terms[i])
    if "capacity" in case or case.startswith("one expert"):
        assert ra.dropped > 0
    if case.startswith("empty expert"):
        assert not (ra.expert_TK == 0).any()
    if not norm:  # raw probabilities: a token's kept weights sum below 1
        assert (ra.weight_TK.sum(-1) < 1).all()


def _spec(name: str):
    """tiny-pr-moe with top-2, or with today's blocks and top-3 of raw probabilities."""
    from moeplan.spec import load_model

    if name == "top-3 raw (today's blocks)":
        from dist_cases import modern_spec

        return modern_spec()
    return load_model("tiny-pr-moe").model_copy(update={"top_k": 2})


SPECS = ["top-2", "top-3 raw (today's blocks)"]


@pytest.mark.parametrize("name", SPECS)
def test_whole_model_with_either_implementation(name):
    from moeplan.runtime.model import GPT

    spec = _spec(name)
    B, S = 2, 16
    x = torch.randint(0, 256, (B, S + 1))
    results = []
    for impl in (REFERENCE, TRITON):
        torch.manual_seed(0)
        model = GPT(spec)
        use_kernels(model, impl)
        loss, _ = model.loss(x[:, :-1], x[:, 1:])
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                                      if p.grad is not None}))
    chain = gpt_chain(spec, tokens=B * S, seq=S)
    assert abs(results[1][0] - results[0][0]) <= rounding_atol(torch.float32, chain,
                                                               abs(results[0][0]))
    scale = max(magnitude(g) for g in results[0][1].values())
    for name, grad in results[0][1].items():
        assert_rounding_close(results[1][1][name], grad, chain, scale)


def test_selection_picks_the_reference_off_cuda():
    assert select(torch.device("cpu")) is REFERENCE
    assert gating.dispatch is REFERENCE.dispatch


def test_grouped_and_looped_expert_ffn_agree():
    from moeplan.runtime.kernels import ffn_grouped, ffn_loop

    g = torch.Generator().manual_seed(5)
    P, L, C, H, F_ = 2, 3, 5, 7, 11
    x = torch.randn(P, L, C, H, generator=g, requires_grad=True)
    ws = [torch.randn(*s, generator=g, requires_grad=True)
          for s in ((L, H, F_), (L, F_), (L, F_, H), (L, H))]
    # forward: reductions over H then F; backward: over H then F again, and the weight gradients
    # over each expert's P·C rows
    for add_b2 in (True, False):
        a, b = ffn_loop(x, *ws, add_b2), ffn_grouped(x, *ws, add_b2)
        assert_rounding_close(b, a, chain=H + F_)
        ga = torch.autograd.grad(a.square().sum(), [x, *ws], allow_unused=True)
        gb = torch.autograd.grad(b.square().sum(), [x, *ws], allow_unused=True)
        for p, q in zip(ga, gb):
            if p is not None:
                assert_rounding_close(q, p, chain=2 * (H + F_) + P * C)


@pytest.mark.parametrize("case, T, E, k, cap, H, pad, norm", CASES, ids=[c[0] for c in CASES])
def test_one_launch_inference_gate_equals_reference(case, T, E, k, cap, H, pad, norm):
    """Inference (no gradients, no aux loss): the whole routing table from one kernel launch,
    the same table as the reference's."""
    from moeplan.runtime.kernels.triton_moe import gate_infer

    g = torch.Generator().manual_seed(hash(case) % 1000 + 1)
    logits = logits_for(case, T, E, g)
    valid = (torch.arange(T) < T - pad) if pad else None
    with torch.no_grad():
        ra = REFERENCE.gate(logits, k, cap, valid, with_aux=False, renormalize=norm)
        rb = gate_infer(logits, k, cap, valid, renormalize=norm)
        assert TRITON.gate(logits, k, cap, valid, with_aux=False,
                           renormalize=norm).slot_TK.shape == (T, k)
    assert torch.equal(ra.expert_TK, rb.expert_TK) and torch.equal(ra.keep_TK, rb.keep_TK)
    assert torch.equal(ra.slot_TK[ra.keep_TK], rb.slot_TK[rb.keep_TK])
    assert int(ra.dropped) == int(rb.dropped) and int(ra.routed) == int(rb.routed)
    assert_rounding_close(rb.weight_TK, ra.weight_TK, chain=E + k)  # softmax, then top-k's sum
    assert float(rb.aux_loss) == 0.0


@pytest.mark.parametrize("gated, bias, dtype", [
    (False, True, torch.float32), (True, False, torch.float32), (True, True, torch.float32),
    (False, False, torch.float32), (False, True, torch.float16), (True, True, torch.float16)])
def test_inference_grouped_ffn_skips_experts_without_tokens(gated, bias, dtype):
    """An expert whose rows are all empty reads no weight: its weights are NaN here, and its
    output is exact zeros (a read would spread NaN); the others equal the reference's — for
    GELU experts with biases, and gated (SwiGLU) or bias-free ones; in fp32 and in fp16, as a
    plan served in half precision runs it. Not bf16: Triton 3.9's interpreter multiplies bf16
    operands of tl.dot as their raw uint16 storage (interpreter.py create_dot converts only
    8-bit floats), so bf16 is left to a GPU."""
    from moeplan.runtime.kernels import ffn_loop, ffn_triton

    g = torch.Generator().manual_seed(7)
    P, L, C, H, F_ = 2, 3, 5, 20, 40
    x = torch.randn(P, L, C, H, generator=g).to(dtype)
    x[:, 1] = 0.0  # expert 1 received no token
    x[:, 2, 3:] = 0.0  # expert 2 only a few rows: padding rows stay
    w1, w2, w3 = (torch.randn(*s, generator=g).to(dtype)
                  for s in ((L, H, F_), (L, F_, H), (L, H, F_)))
    b1, b2, b3 = (torch.randn(L, n, generator=g).to(dtype) if bias else None
                  for n in (F_, H, F_))
    for w in (w1, w2, w3):
        w[1] = float("nan")
    gate = (w3, b3) if gated else ()
    with torch.no_grad():
        want = ffn_loop(x, w1, b1, w2, b2, True, *gate)
        got = ffn_triton(x, w1, b1, w2, b2, True, *gate)
    assert torch.equal(got[:, 1], torch.zeros_like(got[:, 1]))
    keep = [0, 2]
    assert got.dtype == dtype
    # forward reductions over H then F (the gated product adds one rounding), and in fp16 the
    # roundings of the intermediate and the output to fp16 (the kernel accumulates in fp32)
    assert_rounding_close(got[:, keep], want[:, keep],
                          chain=H + F_ + gated + (2 if dtype == torch.float16 else 0))


@pytest.mark.parametrize("name", SPECS)
def test_generation_on_the_triton_fast_path_equals_the_reference(name):
    """Greedy decoding with the one-launch gate and the skipping grouped GEMM (what CUDA runs)
    gives the reference's tokens."""
    from moeplan.runtime.infer import generate
    from moeplan.runtime.model import GPT

    spec = _spec(name)
    prompt = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(4))
    tokens = []
    for impl in (REFERENCE, TRITON):
        torch.manual_seed(0)
        model = GPT(spec)
        use_kernels(model, impl)
        tokens.append(generate(model, prompt, 6, graph=False))
    assert torch.equal(tokens[0], tokens[1]) and tokens[0].unique().numel() > 1


@pytest.mark.parametrize("k, renormalize", [(1, True), (2, True), (6, True), (8, False)])
def test_training_gate_launches_what_the_cost_model_charges(k, renormalize, monkeypatch):
    """The Triton training gate's forward, torch ops and launches, for any top-k: what
    `runtimes.operations` charges a moerun gate on a GPU beside the norm, the router GEMM and
    its casts."""
    from moeplan.cost_models.runtimes import CUDA_GATE_AROUND, operations
    from moeplan.spec import load_model
    from moeplan.spec.phases import Phase

    logits = torch.randn(64, 16, generator=torch.Generator().manual_seed(1)).requires_grad_()
    n, _ = count_ops(lambda: TRITON.gate(logits, k, 20, torch.ones(64, dtype=torch.bool),
                                         renormalize=renormalize), monkeypatch)
    spec = load_model("tiny-pr-moe").model_copy(update={
        "top_k": k, "renormalize_top_k": renormalize, "use_rts": False,
        "noisy_gate_policy": "none", "second_expert_sampling": False})
    fwd_and_bwd = 3 * operations("moerun", "gpu", Phase.GATE, True, spec=spec)
    backward = 24  # the backward's count is an estimate (autograd nodes), not recounted here
    assert n == fwd_and_bwd - backward - CUDA_GATE_AROUND


@pytest.mark.parametrize("k, renormalize, gated", [(1, True, False), (2, True, True),
                                                    (6, True, True), (8, False, False)])
def test_inference_path_launches_what_the_cost_model_charges(k, renormalize, gated,
                                                             monkeypatch):
    """Inference on the Triton path (no gradients): the torch ops and kernel launches of the
    gate, dispatch, skipping expert GEMMs and combine are what `runtimes.operations` charges a
    moerun decode step on a GPU (experts received from two ranks)."""
    from moeplan.cost_models.runtimes import CUDA_GATE_AROUND, operations
    from moeplan.runtime.kernels import ffn_triton
    from moeplan.spec import load_model
    from moeplan.spec.phases import Phase

    g = torch.Generator().manual_seed(2)
    T, E, H, F_, cap = 4, 16, 8, 12, 4
    logits, x = torch.randn(T, E, generator=g), torch.randn(T, H, generator=g)
    L = E // 2
    w = [torch.randn(L, H, F_), torch.randn(L, F_), torch.randn(L, F_, H), torch.randn(L, H)]
    gate = (torch.randn(L, H, F_), torch.randn(L, F_)) if gated else ()
    counted = {}
    with torch.no_grad():
        counted[Phase.GATE], r = count_ops(lambda: TRITON.gate(
            logits, k, cap, None, with_aux=False, renormalize=renormalize), monkeypatch)
        counted[Phase.DISPATCH], buf = count_ops(lambda: TRITON.dispatch(x, r, E), monkeypatch)
        received = buf.view(2, L, cap, H)  # [P, L, C, H], as after the exchange
        counted[Phase.EXPERTS], y = count_ops(lambda: ffn_triton(received, *w, True, *gate),
                                              monkeypatch)
        counted[Phase.COMBINE], _ = count_ops(lambda: TRITON.combine(y.reshape(E, cap, H), r),
                                              monkeypatch)
    spec = load_model("tiny-pr-moe").model_copy(update={
        "top_k": k, "renormalize_top_k": renormalize, "mlp": "swiglu" if gated else "gelu"})
    for phase, n in counted.items():
        around = CUDA_GATE_AROUND if phase == Phase.GATE else 0
        assert n + around == operations("moerun", "gpu", phase, False, spec=spec), phase


def test_the_shared_rotary_table_made_in_inference_mode_serves_training():
    """The rotary table is shared by every layer and pass: made first under inference_mode
    (a user's evaluation), it still serves a training step's backward."""
    from dist_cases import modern_spec

    from moeplan.runtime import attention
    from moeplan.runtime.model import GPT

    attention._ROTARY.clear()
    torch.manual_seed(0)
    model = GPT(modern_spec())
    x = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        model.eval()
        model(x[:, :-1])
    model.train()
    loss, _ = model.loss(x[:, :-1], x[:, 1:])
    loss.backward()
    assert torch.isfinite(loss.detach())
