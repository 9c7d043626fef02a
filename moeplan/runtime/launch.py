"""Start ranks on this host through PyTorch's elastic launcher (torch.distributed.run / torchrun).

Shared by `moerun` and `moeplan profile`: one rank per process, no restarts, a fast monitor so
that a dead rank stops the job at once; a failure becomes a `RankFailedError` (one line).
"""

from __future__ import annotations

import logging
import os
import sys

from moeplan.errors import Interrupted, RankFailedError


LAUNCHER_PID = "MOEPLAN_LAUNCHER_PID"  # the process whose death ends the ranks it started


def die_with_launcher() -> None:
    """Called first in a rank. Linux: the kernel kills the rank when the process that started
    it dies (SIGKILL of `moerun` leaves no orphan training on and later writing its --out or
    --save); a launcher already gone before that was set ends the rank at once."""
    launcher = os.environ.get(LAUNCHER_PID)
    if not sys.platform.startswith("linux") or launcher is None:
        return
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(launcher):
        os._exit(1)


def launch(nproc: int, module: str, args: list[str]) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # CPU ranks share the host's cores
    # the ranks' parent (torchrun's agent runs in this process): they die with it
    os.environ[LAUNCHER_PID] = str(os.getpid())
    os.environ.setdefault("LOGLEVEL", "ERROR")  # read by torchrun's logger when it is imported
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run as torchrun

    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    parsed = get_args_parser().parse_args(
        ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "--max-restarts", "0",
         "--monitor-interval", "0.2", "--module", module, *args])
    try:
        torchrun(parsed)
    except (SignalException, KeyboardInterrupt):
        raise Interrupted(f"interrupted; the job was stopped on all {nproc} ranks") from None
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        why = "killed by a signal" if code < 0 else f"exit code {code}"
        raise RankFailedError(f"rank {rank} failed ({why}); the job was stopped on all {nproc} "
                              "ranks (see that rank's message above)",
                              exit_code=2 if code == 2 else 1) from None
