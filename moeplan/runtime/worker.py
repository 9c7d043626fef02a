"""The per-rank entry point that `moerun` starts through torch.distributed.run (torchrun).

    torchrun --nproc-per-node N -m moeplan.runtime.worker --plan plan.json --out run.json

Reads RANK / WORLD_SIZE / LOCAL_RANK from the launcher, joins the process group with a bounded
timeout (a dead or stuck peer ends the job instead of hanging it), runs the plan and, on rank 0,
writes run.json atomically. A user error ends the rank with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from moeplan.runtime.comm import backend
from moeplan.runtime.launch import die_with_launcher, take_ctrl_c_once
from moeplan.runtime.run import RunConfig, execute
from moeplan.spec.errors import MoeplanError, one_line
from moeplan.spec.files import write_atomic
from moeplan.spec.plan import Plan


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moeplan.runtime.worker")
    p.add_argument("--plan", required=True)
    p.add_argument("--mode", choices=["train", "infer"], required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="run.json")
    p.add_argument("--save")
    p.add_argument("--load")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--fault", help="RANK:STEP - that rank exits at that step (for tests)")
    p.add_argument("--data")
    p.add_argument("--tokenizer")
    p.add_argument("--schedule-steps", type=int)
    p.add_argument("--teacher")
    p.add_argument("--kd-steps", type=int)
    return p.parse_args(argv)


def _say(line: str) -> None:
    """One write per line: ranks share stderr unbuffered (`-u`), and print() writes the line and
    its newline apart, so two ranks' lines could run together."""
    sys.stderr.write(one_line(line) + "\n")


def main(argv: list[str] | None = None) -> int:
    die_with_launcher()
    take_ctrl_c_once()
    a = parse(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        torch.set_num_threads(1)
    try:
        plan = Plan.model_validate_json(Path(a.plan).read_text())
        fault = tuple(int(x) for x in a.fault.split(":")) if a.fault else None
        cfg = RunConfig(mode=a.mode, steps=a.steps, warmup=a.warmup, lr=a.lr, seed=a.seed,
                        save=a.save, load=a.load, fault=fault, timeout_s=a.timeout,
                        data=a.data, tokenizer=a.tokenizer, schedule_steps=a.schedule_steps,
                        teacher=a.teacher, kd_steps=a.kd_steps)
        if world > 1:
            dist.init_process_group(backend(cuda), timeout=timedelta(seconds=a.timeout))
        record = execute(plan, cfg, rank, world, log=lambda m: print(m, flush=True))
        if record is not None:
            write_atomic(a.out, record.model_dump_json(indent=2) + "\n")
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
    except MoeplanError as e:
        _say(f"moerun rank {rank}: {e}")
        return 2
    except KeyboardInterrupt:  # Ctrl-C reaches every rank: the launcher says it once
        return 130
    except Exception as e:  # a peer died or a collective timed out: say so on one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _say(f"moerun rank {rank}: {type(e).__name__}: {first}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
