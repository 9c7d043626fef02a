"""fp16's dynamic loss scaling and the plan's dtype in training (one CPU rank)."""

from __future__ import annotations

import math

import pytest
import torch

from moeplan.cost_models.env import LayerChoice
from moeplan.planner.planning import Request, fixed_plan
from moeplan.runtime.optim import LossScaler
from moeplan.spec import load_cluster, load_model


def test_loss_scaler_skips_overflows_and_moves_the_scale():
    s = LossScaler(enabled=True, initial=2.0 ** 11, window=3, hysteresis=2)
    finite = [torch.ones(3)]
    assert s.unscale(finite, world=1) and torch.equal(finite[0], torch.full((3,), 2.0 ** -11))
    # two overflows (hysteresis 2) before the scale halves; a skipped step leaves the grads
    for expected in (2.0 ** 11, 2.0 ** 10):
        bad = [torch.tensor([1.0, math.inf])]
        assert not s.unscale(bad, world=1) and s.scale == expected
    assert s.skipped == 2
    for _ in range(3):  # a window of clean steps doubles it
        assert s.unscale([torch.ones(1)], world=1)
    assert s.scale == 2.0 ** 11
    nan = [torch.tensor([math.nan])]
    assert not s.unscale(nan, world=1)
    restored = LossScaler(enabled=True)
    restored.load(s.state())
    assert restored.state() == s.state()


def test_disabled_scaler_is_the_identity():
    s = LossScaler(enabled=False)
    g = [torch.tensor([math.inf])]
    assert s.scale == 1.0 and s.unscale(g, world=1) and math.isinf(g[0].item())


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_training_runs_in_the_plans_dtype(dtype):
    """bf16 and fp16 train under CPU autocast with fp32 weights and Adam states; fp16 scales
    its loss (2^11 at first) and unscales the gradients before clipping. The losses of the
    three precisions start within the low precision's rounding of the loss (bf16 keeps 8
    significant bits: 2^-8 relative) and all fall. The weights, gradients and optimizer states
    the rank holds are the plan's bytes exactly: the plan costs moerun's precision layout (fp32
    weights and gradients under autocast), not DeepSpeed's."""
    from moeplan.runtime.run import RunConfig, execute

    torch.manual_seed(0)
    spec = load_model("tiny-pr-moe")
    req = Request(gpus=1, mode="train", global_batch=4, micro_batch=4, seq_len=32, dtype=dtype)
    choices = {i: LayerChoice(1, 1, "flat", False) for i in spec.moe_layers}
    plan = fixed_plan(spec, load_cluster("local-cpu"), req, 1, choices)
    assert plan.workload.dtype == dtype
    record = execute(plan, RunConfig(mode="train", steps=12, warmup=0, lr=3e-3), 0, 1,
                     log=lambda *_: None)
    losses = record.losses
    assert all(x is not None and math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.3, losses
    assert losses[0] == pytest.approx(math.log(256), rel=2 ** -8 * 4)  # uniform over bytes
    rows = record.memory_comparison
    assert {r.phase for r in rows} >= {"weights", "gradients", "optimizer_states"}
    assert all(r.measured == r.predicted for r in rows), rows


def test_distillation_loss_is_the_softened_kl_times_t_squared():
    from moeplan.runtime.model import distillation_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)
    assert float(distillation_loss(s, s, 2.0)) == pytest.approx(0.0, abs=1e-6)
    T = 2.0
    p_t = torch.softmax(t / T, -1)
    want = (p_t * (torch.log_softmax(t / T, -1) - torch.log_softmax(s / T, -1))).sum(-1).mean()
    # fp32 sums of 11 terms of magnitude <= ~3: within 1e-5 relative
    assert float(distillation_loss(s, t, T)) == pytest.approx(float(want) * T * T, rel=1e-5)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_inference_runs_in_the_plans_dtype(dtype):
    """Inference serves the weights, activations and KV cache in the plan's dtype, as the plan
    costs them: the run counts its weights and cache, and they are the plan's bytes exactly
    (half of fp32's in bf16 and fp16)."""
    from moeplan.runtime.run import RunConfig, execute

    torch.manual_seed(0)
    spec = load_model("tiny-pr-moe")
    req = Request(gpus=1, mode="infer", global_batch=4, prompt_len=16, gen_len=8, dtype=dtype)
    choices = {i: LayerChoice(1, 1, "flat", False) for i in spec.moe_layers}
    plan = fixed_plan(spec, load_cluster("local-cpu"), req, 1, choices)
    record = execute(plan, RunConfig(mode="infer", steps=1, warmup=0), 0, 1,
                     log=lambda *_: None)
    predicted = plan.predicted.memory_breakdown_bytes
    measured = record.measured.memory_bytes
    assert set(measured) == {"weights", "expert_weights", "kv_cache"}
    for term, nbytes in measured.items():
        assert nbytes == predicted[term], term
    assert record.measured.latency_s > 0
    assert {row.phase for row in record.memory_comparison} == set(measured)


def test_the_router_stays_fp32_under_autocast():
    """Autocast would run the router's linear in bf16 (it is on autocast's low-precision list)
    and only then cast its logits to fp32; DeepSpeed's gate, and the cost model, compute the
    router in fp32. Under autocast the logits equal the fp32 model's bit for bit."""
    from moeplan.runtime.model import GPT

    torch.manual_seed(0)
    model = GPT(load_model("tiny-pr-moe")).eval()
    x = torch.randint(0, 256, (2, 16))
    seen = {}
    moe = next(b.ffn for b in model.blocks if hasattr(b.ffn, "router"))
    real_gate = moe.kernels.gate

    def gate(logits_TE, *args, **kwargs):
        seen.setdefault("logits", []).append(logits_TE.clone())
        return real_gate(logits_TE, *args, **kwargs)

    moe.kernels = moe.kernels.__class__(moe.kernels.name, gate, moe.kernels.dispatch,
                                        moe.kernels.combine, moe.kernels.ffn)
    with torch.no_grad():
        hidden = {}
        moe.register_forward_pre_hook(lambda m, args: hidden.setdefault("x", args[0].clone()))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
    got = seen["logits"][0]
    assert got.dtype == torch.float32
    xr = hidden["x"].reshape(-1, hidden["x"].shape[-1]).float()
    want = torch.nn.functional.linear(xr, moe.router.weight.float())
    assert torch.equal(got, want)


def test_tokens_cross_the_exchange_in_the_autocast_dtype():
    """Under autocast the residual stream and the layer norm's output are fp32, but the experts'
    GEMMs compute in bf16: the tokens are cast before dispatch, so the all-to-all moves 2-byte
    rows, as the plan charges (the GEMM would make the same cast: the result is unchanged)."""
    from moeplan.runtime.model import GPT

    torch.manual_seed(0)
    model = GPT(load_model("tiny-pr-moe"))
    moe = next(b.ffn for b in model.blocks if hasattr(b.ffn, "router"))
    dtypes = []
    real = moe.kernels.dispatch

    def dispatch(x_TH, r, E):
        out = real(x_TH, r, E)
        dtypes.append(out.dtype)
        return out

    moe.kernels = moe.kernels.__class__(moe.kernels.name, moe.kernels.gate, dispatch,
                                        moe.kernels.combine, moe.kernels.ffn)
    x = torch.randint(0, 256, (2, 17))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model.loss(x[:, :-1], x[:, 1:])
    loss.backward()
    assert dtypes == [torch.bfloat16]
    assert moe.router.weight.grad is not None and moe.experts.w1.grad.dtype == torch.float32
