"""An emulated multi-node cluster on one host: network namespaces as nodes, rate-limited links.

    sudo python bench/emulated_cluster.py [--nodes 2] [--ranks-per-node 2]
                                          [--links 200mbit,200mbit+5000,200mbit+10000,200mbit+20000]
                                          [--seqs 16,64,128] [--rounds 5] [--steps 10]
                                          [--out emulated.json]
    python bench/emulated_cluster.py --recost emulated.json --work DIR   (no privileges needed)

Creates namespaces moeplan-node0..N-1, each with one veth (eth0 inside, 10.77.0.(i+1)/24) to a
bridge moeplan-br0 in its own namespace, and a token-bucket filter (`tc ... tbf`) on every node's
egress — the inter-node link. netem is not available in every kernel, so there is no added
delay; a link given as RATE+BYTES charges BYTES on every packet (`tc ... stab overhead`), a
per-message cost that stands in for latency. Ranks of one node talk over the namespace's
loopback, unlimited. For each link in turn:
  1. `moeplan profile` across the nodes (torchrun per namespace, c10d rendezvous),
  2. for each configuration (model, tokens), a flat and a hierarchical plan are run with moerun's
     worker across the nodes, each `--rounds` times in turn, and the planner's choice (search on
     the measured profile) is compared with the one whose median run was faster.
Everything is torn down after each link, also on failure or Ctrl-C. Only addresses inside the
namespaces this script made are used. Without the privileges for `ip netns`, it says so and
exits 0 (skipped). Prints JSON: per link and configuration, and the agreement over the
configurations whose two algorithms measured more than 10% apart. `--recost` judges an earlier
run's measurements again with the current model (each link's profile rebuilt from the raw
measurements the run left in its work folder, named in its JSON): the runs themselves do not
depend on the model, only the predictions and the planner's choice do.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

PREFIX = "moeplan-node"
BRIDGE_NS = "moeplan-br"
SUBNET = "10.77.0"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def can_use_netns() -> str | None:
    probe = "moeplan-probe"
    r = sh("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        return r.stderr.strip() or "ip netns add failed"
    sh("ip", "netns", "del", probe, check=False)
    return None


def up(nodes: int, rate: str, burst: str, overhead: int) -> None:
    sh("ip", "netns", "add", BRIDGE_NS)
    sh("ip", "netns", "exec", BRIDGE_NS, "ip", "link", "add", "br0", "type", "bridge")
    sh("ip", "netns", "exec", BRIDGE_NS, "ip", "link", "set", "br0", "up")
    for i in range(nodes):
        ns = f"{PREFIX}{i}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", f"mp{i}a", "type", "veth", "peer", "name", f"mp{i}b")
        sh("ip", "link", "set", f"mp{i}a", "netns", ns)
        sh("ip", "link", "set", f"mp{i}b", "netns", BRIDGE_NS)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", f"mp{i}a", "name", "eth0")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", "eth0")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        sh("ip", "netns", "exec", BRIDGE_NS, "ip", "link", "set", f"mp{i}b", "master", "br0")
        sh("ip", "netns", "exec", BRIDGE_NS, "ip", "link", "set", f"mp{i}b", "up")
        # the inter-node link: a token bucket on the node's egress; `overhead` bytes charged on
        # every packet (tc's size table) stand in for a per-message cost such as latency
        stab = ["stab", "overhead", str(overhead), "linklayer", "ethernet"] if overhead else []
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", *stab,
           "tbf", "rate", rate, "burst", burst, "latency", "50ms")


def down(nodes: int) -> None:
    for i in range(nodes):
        sh("ip", "netns", "del", f"{PREFIX}{i}", check=False)
    sh("ip", "netns", "del", BRIDGE_NS, check=False)


def across_nodes(nodes: int, per_node: int, module_args: list[str], port: int,
                 timeout: float = 600) -> None:
    """torchrun in every namespace, one c10d rendezvous on node 0's address."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1",
           "LOGLEVEL": "ERROR"}
    procs = []
    for i in range(nodes):
        cmd = ["ip", "netns", "exec", f"{PREFIX}{i}", sys.executable, "-m",
               "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", str(per_node),
               "--node-rank", str(i), "--master-addr", f"{SUBNET}.1", "--master-port", str(port),
               "--max-restarts", "0", *module_args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + timeout
    errors = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise RuntimeError("a node did not finish in time") from None
        if p.returncode != 0:
            lines = [l for l in err.strip().splitlines() if l.strip(" =")]
            said = [l for l in lines if "moerun rank" in l or "Error" in l]
            errors.append((said or lines or [f"exit {p.returncode}"])[-1][:300])
    if errors:
        raise RuntimeError(f"a node failed: {errors}")


def _both(spec, cluster, req, world: int, prefix: str, k: int, N: int, G: int, steps: int,
          rounds: int, port_base: int = 0) -> dict[str, list[float]]:
    """Measured all-to-all seconds per step of the flat and hierarchical plans, one per round
    (the two run in turn for `rounds` rounds: ranks sharing cores make single runs noisy)."""
    from moeplan.spec.record import RunRecord

    samples: dict[str, list[float]] = {"flat": [], "hierarchical": []}
    plans = {}
    for algo, p in _plans(spec, cluster, req, world).items():
        plans[algo] = Path(f"{prefix}c{k}-{algo}.plan.json")
        plans[algo].write_text(p.to_json())
    for r in range(rounds):
        for algo, pf in plans.items():
            rf = Path(f"{prefix}c{k}-{algo}-{r}.run.json")
            across_nodes(N, G, ["-m", "moeplan.runtime.worker", "--plan", str(pf), "--mode",
                                "train", "--steps", str(steps), "--warmup", "2", "--out",
                                str(rf)],
                         port=29520 + port_base + 2 * (rounds * k + r) + (algo == "flat"))
            run = RunRecord.model_validate_json(rf.read_text())
            samples[algo].append(sum(l.phases_s.get(ph, 0) for l in run.layers
                                     for ph in ("dispatch_a2a", "combine_a2a")))
    return samples


def parse_link(spec: str) -> tuple[str, int]:
    """"200mbit" or "200mbit+20000": the rate and the bytes charged on every packet."""
    rate, _, overhead = spec.partition("+")
    if not rate or not (overhead or "0").isdigit():
        raise argparse.ArgumentTypeError(f"bad link {spec!r}: want RATE or RATE+BYTES, "
                                         "e.g. 200mbit+20000")
    return rate, int(overhead or 0)


def parse_links(text: str) -> list[str]:
    links = text.split(",")
    for link in links:
        parse_link(link)
    return links


def one_link(a, link: str, index: int, work: Path) -> dict:
    """Bring the nodes up with this inter-node link, profile them, and compare the planner's
    choice with the faster algorithm for every configuration; the nodes are taken down after."""
    from moeplan.spec import load_cluster, load_model

    N, G = a.nodes, a.ranks_per_node
    world = N * G
    rate, overhead = parse_link(link)
    out: dict = {"link": link, "rate": rate, "overhead": overhead, "burst": a.burst}
    down(N)  # leftovers of an interrupted run
    try:
        up(N, rate, a.burst, overhead)
        t0 = time.perf_counter()
        profile = work / f"emulated-{index}.json"
        across_nodes(N, G, ["-m", "moeplan.calibrate.measure", "--out", str(profile),
                            "--gpus-per-node", str(G), "--base", "local-cpu", "--name",
                            "emulated", "--backend", "gloo"] + (["--quick"] if a.quick else []),
                     port=29511 + 1000 * index)
        out["profile_s"] = round(time.perf_counter() - t0, 1)
        cluster = load_cluster(str(profile))
        out["inter_all_to_all"] = cluster.fitted_for("all_to_all", "inter").model_dump()
        out["exchanges"] = [e.model_dump() for e in cluster.exchanges]
        print(json.dumps({"link": link, "profile_s": out["profile_s"], "credit_ms": {
            e.algorithm: round(e.credit_s * 1e3, 2) for e in cluster.exchanges}}), file=sys.stderr)
        configs = [(model, seq) for model in MODELS.values() for seq in a.seqs]
        rows = []
        for k, (model, seq) in enumerate(configs[:a.configs]):
            try:
                rounds = _both(load_model(model), cluster, _request(world, seq), world, f"{work}/l{index}-", k, N, G,
                               a.steps, a.rounds, 1000 * index)
            except RuntimeError as e:  # one configuration failing does not end the benchmark
                rows.append({"model": Path(model).stem, "seq_len": seq, "error": str(e)})
                continue
            rows.append({"link": link, **judge(model, seq, cluster, world, rounds)})
            print(json.dumps(rows[-1]), file=sys.stderr)
        out["configs"] = rows
    finally:
        down(N)
    return out


MODELS = {"tiny-pr-moe": "tiny-pr-moe",
          "small-pr-moe": str(Path(__file__).parent / "data" / "small-pr-moe.json")}


def _plans(spec, cluster, req, world: int) -> dict:
    """The flat and the hierarchical plan of a configuration: every MoE layer expert-parallel
    over as many ranks as it has experts, with that all-to-all where it spans the world."""
    from moeplan.cost_models.env import LayerChoice
    from moeplan.planner.planning import fixed_plan

    return {algo: fixed_plan(spec, cluster, req, 1, {
        i: LayerChoice(ep=min(E, world), es=1, a2a=algo if min(E, world) == world else "flat",
                       coordinated=False) for i, E in enumerate(spec.experts) if E})
            for algo in ("flat", "hierarchical")}


def _request(world: int, seq: int):
    from moeplan.planner.planning import Request

    return Request(gpus=world, mode="train", global_batch=world, seq_len=seq, zero_stage=0,
                   simulate_top=0)


def judge(model: str, seq: int, cluster, world: int, rounds: dict[str, list[float]]) -> dict:
    """A configuration's measured all-to-all per step (each algorithm's rounds) against what the
    profile `cluster` predicts for both plans and which one the planner's search chooses."""
    from moeplan.calibrate.in_situ import predicted_phases_s
    from moeplan.planner.planning import Request, plan
    from moeplan.spec import load_model

    spec = load_model(MODELS.get(model, model))
    predicted = {algo: predicted_phases_s(p, ("dispatch_a2a", "combine_a2a"))
                 for algo, p in _plans(spec, cluster, _request(world, seq), world).items()}
    best, _ = plan(spec, cluster, Request(gpus=world, mode="train", global_batch=world,
                                          seq_len=seq, zero_stage=0, micro_batch=1))
    chosen = {l.a2a for l in best.layers if l.kind == "moe" and l.ep == world} or {"flat"}
    measured = {algo: median(v) for algo, v in rounds.items()}
    faster = min(measured, key=measured.get)
    gap = abs(measured["flat"] - measured["hierarchical"]) / min(measured.values())
    return {"model": Path(model).stem, "seq_len": seq, "measured_a2a_s": measured,
            "measured_rounds_s": rounds, "predicted_a2a_s": predicted,
            "planner_chose": sorted(chosen), "measured_faster": faster, "gap": round(gap, 3),
            "agrees": faster in chosen}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--ranks-per-node", type=int, default=2)
    ap.add_argument("--links", default="200mbit,200mbit+5000,200mbit+10000,200mbit+20000",
                    type=parse_links,
                    help="inter-node links to test, one after the other: RATE (tc tbf) or "
                         "RATE+BYTES, BYTES charged on every packet (tc stab) — a per-message "
                         "cost, as latency would be (netem is not available)")
    ap.add_argument("--burst", default="256kb", help="the token bucket's size (tc tbf)")
    ap.add_argument("--seqs", default="16,64,128", type=lambda v: [int(x) for x in v.split(",")],
                    help="sequence lengths; each with tiny-pr-moe and small-pr-moe")
    ap.add_argument("--configs", type=int, default=None,
                    help="at most this many configurations per link")
    ap.add_argument("--steps", type=int, default=10,
                    help="measured steps per run (the host's slow spells last seconds)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="runs of each plan, in turn; the median counts")
    ap.add_argument("--quick", action="store_true", help="quick profile")
    ap.add_argument("--out", default=None)
    ap.add_argument("--recost", metavar="RESULT",
                    help="no network: judge an earlier run's measurements (its --out JSON) again "
                         "with the current model, each link's profile rebuilt from its raw "
                         "measurements in --work")
    ap.add_argument("--work", type=Path, help="the earlier run's work folder (with --recost)")
    a = ap.parse_args()
    if a.recost:
        if a.work is None or not (a.work / "emulated-0.raw.json").exists():
            ap.error("--recost needs --work, the earlier run's folder with emulated-N.raw.json")
        return report(recost(json.loads(Path(a.recost).read_text()), a.work), a)
    why = can_use_netns()
    if why:
        print(json.dumps({"bench": "emulated_cluster", "skipped": True,
                          "reason": f"cannot create network namespaces here ({why}); run as "
                                    "root or with CAP_NET_ADMIN"}))
        return 0
    work = Path(tempfile.mkdtemp(prefix="moeplan-emulated-"))
    os.chmod(work, 0o755)
    print(json.dumps({"work": str(work)}), file=sys.stderr)
    return report({"bench": "emulated_cluster", "nodes": a.nodes,
                   "ranks_per_node": a.ranks_per_node, "steps": a.steps, "rounds": a.rounds,
                   "work": str(work),
                   "links": [one_link(a, link, i, work) for i, link in enumerate(a.links)]}, a)


def recost(result: dict, work: Path) -> dict:
    """`result`'s measured rounds judged by the current model: each link's profile rebuilt
    from the raw measurements the run kept (`moeplan profile`'s own build)."""
    from moeplan.calibrate.build import build_profile

    links = []
    for i, link in enumerate(result["links"]):
        raw = json.loads((work / f"emulated-{i}.raw.json").read_text())
        info = raw.pop("info")
        cluster = build_profile("local-cpu", "emulated", result["ranks_per_node"], info, raw)
        world = result["nodes"] * result["ranks_per_node"]
        links.append({**link, "exchanges": [e.model_dump() for e in cluster.exchanges],
                      "configs": [r if "error" in r else {"link": link["link"], **judge(
                          r["model"], r["seq_len"], cluster, world, r["measured_rounds_s"])}
                                  for r in link["configs"]]})
    return {**result, "recosted": True, "links": links}


def report(out: dict, a) -> int:
    """Adds the agreement over every configuration and over the decisive ones (the two
    algorithms measured more than 10% apart) and the all-to-all's relative error (predicted vs
    measured, both algorithms of every configuration); prints a table (stderr) and the JSON."""
    rows = [r for link in out["links"] for r in link["configs"]]
    done = [r for r in rows if "error" not in r]
    decisive = [r for r in done if r["gap"] > 0.10]
    errors = [abs(r["predicted_a2a_s"][algo] / r["measured_a2a_s"][algo] - 1)
              for r in done for algo in ("flat", "hierarchical")]
    out = {**out, "configurations": len(rows),
           "agreement_all": sum(r.get("agrees", False) for r in rows),
           "decisive": len(decisive), "agreement": sum(r["agrees"] for r in decisive),
           "a2a_abs_error_median": round(median(errors), 4) if errors else None,
           "a2a_abs_error_worst": round(max(errors), 4) if errors else None}
    _print_table(out)
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


def _print_table(out: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="all-to-all per step, ms (predicted / measured median)",
                  title_justify="left")
    for c in ("link", "model", "seq", "credit", "flat", "hierarchical", "gap", "planner",
              "faster", "agrees"):
        table.add_column(c, justify="left" if c in ("link", "model") else "right")
    for link in out["links"]:
        credit = {round(e["credit_s"] * 1e3, 2) for e in link.get("exchanges", [])}
        for r in link["configs"]:
            if "error" in r:
                table.add_row(link["link"], r["model"], str(r["seq_len"]), "", r["error"][:40])
                continue
            p, m = r["predicted_a2a_s"], r["measured_a2a_s"]
            table.add_row(link["link"], r["model"], str(r["seq_len"]),
                          "/".join(f"{c:g}" for c in sorted(credit)),
                          *(f"{p[x] * 1e3:.1f} / {m[x] * 1e3:.1f}" for x in ("flat", "hierarchical")),
                          f"{r['gap']:.0%}", ",".join(r["planner_chose"]), r["measured_faster"],
                          ("yes" if r["agrees"] else "no") + (" *" if r["gap"] > 0.10 else ""))
    console = Console(stderr=True, highlight=False, width=140)
    console.print(table)
    err = out["a2a_abs_error_median"]
    console.print(f"* decisive (measured >10% apart): {out['agreement']} of {out['decisive']} "
                  f"agree; all: {out['agreement_all']} of {out['configurations']}; median |a2a "
                  f"error| {err:.1%}, worst {out['a2a_abs_error_worst']:.1%}" if err is not None
                  else "no configuration ran")


if __name__ == "__main__":
    sys.exit(main())
