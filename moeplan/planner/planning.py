"""From a request to a `Plan`: validate the inputs, search, and write the plan's predictions.

This is the library entry point behind `moeplan search`; the CLI only parses and prints.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Literal, get_args

from moeplan import __version__
from moeplan.cost_models.env import DENSE, Env, LayerChoice
from moeplan.cost_models.layer import COMPUTE_PHASES
from moeplan.cost_models.runtimes import a2a_algorithms, coordination, slices_experts
from moeplan.cost_models.step import head_cost, prefill_head_s, teacher_cost, with_untimed
from moeplan.planner.band import band
from moeplan.planner.diagnose import describe_layers, over_budget
from moeplan.planner.options import Candidate, evaluate
from moeplan.planner.search import Objective, SearchResult, SearchStats, search
from moeplan.planner.simulate import simulate
from moeplan.planner.space import NO_FIX, Fix, layer_choices
from moeplan.spec.cluster import ClusterProfile
from moeplan.spec.errors import ConfigError, InfeasibleError, MoeplanError
from moeplan.spec.model import ModelSpec
from moeplan.spec.phases import Phase
from moeplan.spec.plan import (
    ClusterRef,
    LayerPlan,
    LayerPrediction,
    Parallel,
    Plan,
    Predicted,
    Provenance,
    SearchSummary,
    Teacher,
    digest,
)
from moeplan.spec.plan import Objective as PlanObjective
from moeplan.spec.workload import Setting, Workload
from moeplan.spec.zoo import load_cluster, load_model

DEFAULT_TRAIN_BATCH = 512
DEFAULT_PROMPT_LEN = 512
DEFAULT_GEN_LEN = 128
# Training sequences default to the model's positions, at most 4096: a Hugging Face config's
# positions are its context window, not the length most of its tokens trained at (4K:
# DeepSeek-V3 technical report, pre-training hyper-parameters; Qwen3 technical report,
# pre-training stages 1 and 2; OLMoE's 4096 positions).
DEFAULT_TRAIN_SEQ_LEN = 4096
# whose kernels, launches and loops are costed: moerun; DeepSpeed-MoE as the paper and DeepSpeed
# up to v0.19.3 run it (one-hot einsum dispatch); DeepSpeed from v0.19.4 (index dispatch)
Runtime = Literal["moerun", "deepspeed", "deepspeed-sparse"]
RUNTIMES: tuple[str, ...] = get_args(Runtime)


@dataclass(frozen=True)
class Request:
    """What the user asked for; None means 'choose for me'."""

    gpus: int
    mode: str = "train"
    objective: str | None = None
    slo_ms: float | None = None
    global_batch: int | None = None
    micro_batch: int | None = None
    seq_len: int | None = None
    prompt_len: int | None = None
    gen_len: int | None = None
    dtype: str | None = None
    zero_stage: int = 1
    simulate_top: int = 16  # analytic best candidates re-ranked by the simulator (0: none)
    routing_skew: float = 0.0
    fix: Fix = NO_FIX  # degrees the user fixed
    runtime: str = "moerun"  # whose kernels and loops are costed: moerun | deepspeed


def infer_lengths(spec: ModelSpec, r: Request) -> tuple[int, int]:
    """(prompt, generated) lengths: as asked, else 512 + 128, scaled to 3/4 + 1/4 of the model's
    positions for models with fewer than 640."""
    if r.prompt_len is not None or r.gen_len is not None:
        return r.prompt_len or DEFAULT_PROMPT_LEN, r.gen_len or DEFAULT_GEN_LEN
    if DEFAULT_PROMPT_LEN + DEFAULT_GEN_LEN <= spec.max_seq_len:
        return DEFAULT_PROMPT_LEN, DEFAULT_GEN_LEN
    prompt = spec.max_seq_len * 3 // 4
    return prompt, spec.max_seq_len - prompt


def train_seq_len(spec: ModelSpec, r: Request) -> int:
    """The training sequence length: as asked, else the model's positions up to 4096."""
    return r.seq_len or min(spec.max_seq_len, DEFAULT_TRAIN_SEQ_LEN)


def check_gpus(gpus: int, cluster: ClusterProfile) -> None:
    """A GPU count the cluster can give: whole nodes, or a divisor of one, within its nodes."""
    G = cluster.gpus_per_node
    if gpus <= 0:
        raise ConfigError(f"--gpus must be a positive number of GPUs, got {gpus}")
    if gpus > G and gpus % G:
        raise ConfigError(f"--gpus {gpus} is not a whole number of {G}-GPU nodes of {cluster.name}")
    if gpus < G and G % gpus:
        raise ConfigError(f"--gpus {gpus} must divide the {G} GPUs of a {cluster.name} node")
    nodes = -(-gpus // G)
    if cluster.max_nodes is not None and nodes > cluster.max_nodes:
        raise ConfigError(f"--gpus {gpus} needs {nodes} nodes; {cluster.name} has {cluster.max_nodes}")


def teacher_of(spec: ModelSpec, seq_len: int) -> ModelSpec:
    """A Mixture-of-Students' teacher (`spec.distillation.teacher`: a built-in model or a file),
    checked to share the student's vocabulary and cover its sequence length."""
    name = spec.distillation.teacher
    try:
        teacher = load_model(name)
    except MoeplanError as e:
        raise ConfigError(f"{spec.name} distils from {name!r}, which does not load: {e}") from None
    if teacher.vocab_size != spec.vocab_size:
        raise ConfigError(f"{spec.name} distils from {teacher.name}, whose vocabulary has "
                          f"{teacher.vocab_size} tokens, not {spec.vocab_size}")
    if teacher.max_seq_len < seq_len:
        raise ConfigError(f"{spec.name} distils from {teacher.name}, which has "
                          f"{teacher.max_seq_len} positions, fewer than the {seq_len} trained")
    return teacher


def _check(spec: ModelSpec, cluster: ClusterProfile, r: Request) -> None:
    check_gpus(r.gpus, cluster)
    if r.mode == "train":
        if r.objective == "latency":
            raise ConfigError("--objective latency applies to --mode infer; training maximises throughput")
        if r.slo_ms is not None:
            raise ConfigError("--slo-ms applies to --mode infer")
        if r.prompt_len is not None or r.gen_len is not None:
            raise ConfigError("--prompt-len/--gen-len apply to --mode infer; use --seq-len for training")
        if (r.seq_len or spec.max_seq_len) > spec.max_seq_len:
            raise ConfigError(f"--seq-len {r.seq_len} exceeds {spec.name}'s {spec.max_seq_len} positions")
        batch = r.global_batch or DEFAULT_TRAIN_BATCH
        if r.micro_batch is not None and batch % r.micro_batch:
            raise ConfigError(f"--global-batch {batch} is not a multiple of --micro-batch "
                              f"{r.micro_batch}")
    else:
        if r.micro_batch is not None:
            raise ConfigError("--micro-batch applies to training; for inference set --global-batch "
                              "(sequences in flight)")
        if r.seq_len is not None:
            raise ConfigError("--seq-len applies to training; for inference use --prompt-len and --gen-len")
        if r.slo_ms is not None and (r.objective or "latency") == "latency":
            raise ConfigError("--slo-ms needs --objective throughput (latency already minimises it)")
        total = sum(infer_lengths(spec, r))
        if total > spec.max_seq_len:
            raise ConfigError(f"--prompt-len + --gen-len = {total} exceeds {spec.name}'s "
                              f"{spec.max_seq_len} positions")
    if r.runtime not in RUNTIMES:
        raise ConfigError(f"--runtime {r.runtime}: expected one of {', '.join(RUNTIMES)}")
    if r.fix.a2a is not None and r.fix.a2a not in a2a_algorithms(r.runtime, r.mode):
        raise ConfigError(f"--fix a2a={r.fix.a2a}: --runtime {r.runtime} exchanges "
                          f"{' or '.join(a2a_algorithms(r.runtime, r.mode))} in {r.mode} "
                          "(DeepSpeed's code has one flat all-to-all)")
    if (r.fix.coordinated is False and (r.fix.tp or 1) > 1
            and False not in coordination(r.runtime, r.fix.tp)):
        raise ConfigError(f"--fix tp-coordinated=false: --runtime {r.runtime} routes the tokens "
                          "tp ranks share once whenever tp > 1 (DeepSpeed's drop_tokens)")
    if None not in (r.fix.es, r.fix.tp) and not slices_experts(r.runtime, r.mode, r.fix.es,
                                                                r.fix.tp):
        raise ConfigError(f"--fix es={r.fix.es}: --runtime {r.runtime} slices experts in training "
                          f"only over the tp={r.fix.tp} group (enable_expert_tensor_parallelism)")
    if r.mode == "infer" and (r.fix.micro_batch is not None or r.fix.recompute is not None):
        raise ConfigError("--fix micro-batch / recompute apply to training; for inference set "
                          "--global-batch (sequences in flight)")
    if None not in (r.fix.micro_batch, r.micro_batch) and r.fix.micro_batch != r.micro_batch:
        raise ConfigError(f"--micro-batch {r.micro_batch} contradicts --fix "
                          f"micro-batch={r.fix.micro_batch}")
    dtype = r.dtype or cluster.default_dtype
    if dtype not in cluster.device.peak_flops:
        raise ConfigError(f"{cluster.device.name} has no {dtype} peak in profile {cluster.name}")


def make_env(spec: ModelSpec, cluster: ClusterProfile, r: Request) -> tuple[Env, Objective]:
    _check(spec, cluster, r)
    dtype = r.dtype or cluster.default_dtype
    if r.mode == "train":
        batch = r.global_batch or DEFAULT_TRAIN_BATCH
        w = Workload(mode="train", global_batch=batch, micro_batch=r.micro_batch or 1,
                     seq_len=train_seq_len(spec, r), dtype=dtype, zero_stage=r.zero_stage)
        objective = Objective("throughput")
        if spec.distillation is not None:
            return Env(spec, cluster, w, r.gpus, runtime=r.runtime,
                       teacher=teacher_of(spec, w.seq_len)), objective
    else:
        prompt, gen = infer_lengths(spec, r)
        name = r.objective or "latency"
        batch = r.global_batch or (r.gpus if name == "latency" else 1)
        w = Workload(mode="infer", global_batch=batch, micro_batch=1, seq_len=prompt + gen,
                     prompt_len=prompt, gen_len=gen, dtype=dtype, zero_stage=0)
        objective = Objective(name, r.slo_ms / 1e3 if r.slo_ms is not None else None)
    return Env(spec, cluster, w, r.gpus, runtime=r.runtime), objective


def plan(spec: ModelSpec, cluster: ClusterProfile, r: Request) -> tuple[Plan, SearchResult]:
    env, objective = make_env(spec, cluster, r)
    free_batch = r.mode == "infer" and objective.name == "throughput" and r.global_batch is None
    batch = None if free_batch else env.workload.global_batch
    result = search(env, objective, batch, r.micro_batch if r.mode == "train" else None,
                    simulate_top=r.simulate_top, skew=r.routing_skew, fix=r.fix)
    return to_plan(env, objective, result, fix_notes(spec, r.fix)), result


def fix_notes(spec: ModelSpec, fix: Fix) -> list[str]:
    """What the plan says about the fixed degrees: an ep above a layer's experts is clamped."""
    if fix.ep is None:
        return []
    by_experts: dict[int, list[int]] = defaultdict(list)
    for i, E in enumerate(spec.experts):
        if 0 < E < fix.ep:
            by_experts[E].append(i + 1)
    return [f"--fix ep={fix.ep} exceeds the {E} experts of layers {describe_layers(layers)}: "
            f"ep={E} there (DeepSpeed 0.6 clamps ep_size so)"
            for E, layers in sorted(by_experts.items())]


def _runner_up_text(result: SearchResult, i: int) -> str | None:
    if i not in result.runner_up:
        return None
    chosen, other = result.runner_up[i]
    c = other.choice
    name = f"ep={c.ep} es={c.es} {c.a2a}{', tp-coordinated' if c.coordinated else ''}"
    dt = other.cost.time_s - chosen.cost.time_s
    if dt >= 0:
        return f"{name}: {dt * 1e3:.3f} ms slower"
    dm = other.cost.memory_bytes + other.cost.transient_bytes - (
        chosen.cost.memory_bytes + chosen.cost.transient_bytes)
    return f"{name}: {-dt * 1e3:.3f} ms faster but {dm / 2**30:.2f} GiB larger, which does not fit"


def _hand_on_waits(layers: list[dict[str, float]], exchanging: list[bool], train: bool,
                   tp: int = 1) -> list[dict[str, float]]:
    """A `wait` (ranks taking turns on shared cores) of a layer without an all-to-all of its own
    (`exchanging[i]`: ep·es > 1) happens at the next collective, where the runtime's timers see
    it. With tensor slicing (tp > 1) that is the layer's own tp allreduce. Otherwise, forward:
    the next exchanging layer's dispatch all-to-all (past the last one: the backward's first,
    the last exchanging layer's combine); backward, two thirds of a training step's compute,
    runs the layers in reverse: the previous exchanging layer's combine, before the first one
    the gradient synchronisation. With no exchange in the whole step the ranks never meet
    mid-step: they share the cores throughout and the wait is slower compute, spread over the
    layer's compute phases."""
    moe = [i for i, x in enumerate(exchanging) if x]
    for i, ph in enumerate(layers):
        wait = ph.pop(Phase.WAIT, 0.0)
        if not wait:
            continue
        if tp > 1 and Phase.TP_COMM in ph:
            ph[Phase.TP_COMM] += wait
        elif not moe:
            compute = {k: v for k, v in ph.items() if k in COMPUTE_PHASES and v > 0}
            total = sum(compute.values())
            for k, v in compute.items():
                ph[k] += wait * v / total
            if not compute:
                key = Phase.GRAD_SYNC if train else Phase.TP_COMM
                ph[key] = ph.get(key, 0.0) + wait
        else:
            forward = wait / 3 if train else wait
            after, before = [j for j in moe if j > i], [j for j in moe if j < i]
            layers[after[0] if after else moe[-1]][
                Phase.DISPATCH_A2A if after else Phase.COMBINE_A2A] += forward
            if train:
                if before:
                    layers[before[-1]][Phase.COMBINE_A2A] += wait - forward
                else:
                    ph[Phase.GRAD_SYNC] = ph.get(Phase.GRAD_SYNC, 0.0) + wait - forward
    return layers


def to_plan(env: Env, objective: Objective, result: SearchResult,
            notes: list[str] | None = None) -> Plan:
    best: Candidate = result.best
    s, w = best.setting, env.workload
    if w.mode == "infer":
        w = w.model_copy(update={"global_batch": best.global_batch, "micro_batch": s.micro_batch})
    else:
        w = w.model_copy(update={"micro_batch": s.micro_batch})
    final_env = replace(env, workload=w)
    layers, breakdown = [], defaultdict(float)
    transient = best.head.transient_bytes
    for k, v in best.head.memory.items():
        breakdown[k] += v
    head_phases = dict(best.head.phases)
    phases = _hand_on_waits(
        [{Phase.WAIT: head_phases.pop(Phase.WAIT, 0.0)}]
        + [dict(ev.cost.phases) for ev in best.layers],
        [False] + [ev.choice.ep * ev.choice.es > 1 for ev in best.layers], w.mode == "train",
        s.tp)
    head_phases.update(phases.pop(0))  # what found no collective stays with the head
    for i, ev in enumerate(best.layers):
        c, cost = ev.choice, ev.cost
        for k, v in cost.memory.items():
            breakdown[k] += v
        transient = max(transient, cost.transient_bytes)
        sim = result.simulated
        pred = LayerPrediction(time_s=sum(phases[i].values()), phases_s=phases[i],
                               comm_bytes=dict(cost.comm_bytes), memory_bytes=dict(cost.memory),
                               transient_bytes=cost.transient_bytes,
                               prefill_s=ev.prefill_s if w.mode == "infer" else None,
                               simulated_s=sum(sim.layers[i].values()) if sim else None,
                               dropped_fraction=(sim.dropped_fraction[i]
                                                 if sim and env.spec.experts[i] else None))
        E = env.spec.experts[i]
        if E:
            layers.append(LayerPlan(index=i + 1, kind="moe", experts=E, ep=c.ep, es=c.es,
                                    edp=c.edp(env.gpus), a2a=c.a2a,
                                    a2a_tp_coordinated=c.coordinated, predicted=pred,
                                    runner_up=_runner_up_text(result, i)))
        else:
            layers.append(LayerPlan(index=i + 1, kind="dense", predicted=pred))
    if transient:
        breakdown["workspace"] = transient
    tokens_per_s = best.tokens_per_s(final_env)
    if w.mode == "train":
        timing = {"step_time_s": best.time_s}
    else:
        prefill = sum(ev.prefill_s for ev in best.layers) + prefill_head_s(final_env, s)
        timing = {"latency_s": best.time_s, "prefill_s": prefill}
    predicted = Predicted(tokens_per_s=tokens_per_s, memory_per_gpu_bytes=best.memory_bytes,
                          band=band(final_env, best),
                          memory_breakdown_bytes=dict(sorted(breakdown.items())),
                          head_phases_s=head_phases, **timing,
                          simulated_time_s=result.simulated.time_s if result.simulated else None,
                          simulated_candidates=result.simulated_candidates,
                          routing_skew=result.skew if result.simulated else None,
                          simulated_critical_path=[
                              f"{ph} {t * 1e3:.3f} ms ({100 * t / result.simulated.time_s:.0f}%)"
                              for ph, t in (result.simulated.critical_path
                                            if result.simulated else [])])
    obj = PlanObjective(name=objective.name,
                        slo_ms=objective.slo_s * 1e3 if objective.slo_s is not None else None)
    teacher = _teacher_plan(final_env, s) if final_env.teacher is not None else None
    return Plan(
        model=env.spec, cluster=cluster_ref(env.cluster, env), workload=w, objective=obj,
        parallel=Parallel(tp=s.tp, dp=s.dp, activation_checkpointing=s.recompute),
        layers=layers, predicted=predicted,
        search=SearchSummary(settings=result.stats.settings,
                             layer_options=result.stats.layer_options,
                             plans_covered=result.stats.plans_covered),
        notes=notes or [], teacher=teacher,
        provenance=Provenance(moeplan_version=__version__, runtime=env.runtime,
                              inputs_digest=inputs_digest(env, obj)))


def _teacher_plan(env: Env, s: Setting) -> Teacher:
    """The teacher's layers with their degrees and forward seconds per training step."""
    t = teacher_cost(env, s)
    layers = []
    for i, (c, cost) in enumerate(t.layers):
        phases = {k: t.micro_steps * v for k, v in cost.phases.items()}
        pred = LayerPrediction(time_s=sum(phases.values()), phases_s=phases,
                               comm_bytes=dict(cost.comm_bytes), memory_bytes=dict(cost.memory),
                               transient_bytes=cost.transient_bytes)
        E = env.teacher.experts[i]
        layers.append(LayerPlan(index=i + 1, kind="moe", experts=E, ep=c.ep, es=c.es,
                                edp=c.edp(env.gpus), a2a=c.a2a, a2a_tp_coordinated=False,
                                predicted=pred) if E else
                      LayerPlan(index=i + 1, kind="dense", predicted=pred))
    return Teacher(model=env.teacher, layers=layers)


def inputs_digest(env: Env, objective: PlanObjective) -> str:
    inputs = {"model": env.spec.model_dump(mode="json"), "cluster": digest(env.cluster),
              "gpus": env.gpus, "workload": env.workload.model_dump(mode="json"),
              "objective": objective.model_dump(mode="json")}
    if env.runtime != "moerun":  # digests of moerun plans stay as they were
        inputs["runtime"] = env.runtime
    return digest(inputs)


def cluster_ref(cluster: ClusterProfile, env: Env) -> ClusterRef:
    return ClusterRef(name=cluster.name, device=cluster.device.name, gpus=env.gpus,
                      gpus_per_node=env.gpus_per_node, nodes=env.nodes,
                      profile_digest=digest(cluster))


def fixed_plan(spec: ModelSpec, cluster: ClusterProfile, r: Request, tp: int,
               choices: dict[int, LayerChoice], micro_batch: int | None = None,
               recompute: bool = False) -> Plan:
    """A plan with the given degrees (0-based layer index -> choice; MoE layers not named get
    ep = E capped at the world size), costed by the same model as the search. For tests,
    validation grids and users who want to predict a configuration of their own."""
    env, objective = make_env(spec, cluster, r)
    dp = env.gpus // tp
    if r.mode == "train":
        mb = micro_batch or env.workload.global_batch // dp
    else:
        mb = env.workload.global_batch // dp
    s = Setting(tp=tp, dp=dp, micro_batch=mb, recompute=recompute)
    layers = []
    for i, E in enumerate(spec.experts):
        if E == 0:
            c = DENSE
        else:
            c = choices.get(i) or LayerChoice(ep=min(E, env.gpus), es=1, a2a="flat",
                                              coordinated=False)
            if c not in layer_choices(env, s, E):
                raise ConfigError(f"layer {i + 1}: {c} is not valid for {E} experts on "
                                  f"{env.gpus} GPUs with tp={tp}")
        layers.append(evaluate(env, s, i, c))
    head = with_untimed(env, s, head_cost(env, s), sum(e.cost.time_s for e in layers))
    cand = Candidate(setting=s, layers=layers, head=head,
                     time_s=head.time_s + sum(e.cost.time_s for e in layers),
                     memory_bytes=head.memory_bytes + sum(e.cost.memory_bytes for e in layers)
                     + max([head.transient_bytes] + [e.cost.transient_bytes for e in layers]))
    if cand.memory_bytes > env.cluster.device.usable_bytes:
        raise InfeasibleError(over_budget(env, s, [e.cost for e in layers], head))
    return to_plan(env, objective, SearchResult(best=cand, stats=SearchStats(),
                                                simulated=simulate(env, cand, r.routing_skew),
                                                simulated_candidates=1, skew=r.routing_skew))


def recost(p: Plan, mode: str) -> Plan:
    """The same degrees costed for another mode (train <-> infer), with that mode's defaults.

    Needs the cluster profile the plan was made with: a built-in one, matched by name and digest."""
    try:
        cluster = load_cluster(p.cluster.name)
    except MoeplanError:
        cluster = None
    if cluster is None or digest(cluster) != p.cluster.profile_digest:
        raise ConfigError(f"the plan is for --mode {p.workload.mode} on profile {p.cluster.name}, "
                          f"which is not built in; run `moeplan search --mode {mode}` with that "
                          "profile for a plan to run")
    choices = {layer.index - 1: LayerChoice(ep=layer.ep, es=layer.es, a2a=layer.a2a,
                                            coordinated=bool(layer.a2a_tp_coordinated))
               for layer in p.layers if layer.kind == "moe"}
    r = Request(gpus=p.cluster.gpus, mode=mode, runtime=p.provenance.runtime)
    return fixed_plan(p.model, cluster, r, p.parallel.tp, choices)
