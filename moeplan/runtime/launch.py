"""Start ranks on this host through PyTorch's elastic launcher (torch.distributed.run / torchrun).

Shared by `moerun` and `moeplan profile`: one rank per process, no restarts, a fast monitor so
that a dead rank stops the job at once; a failure becomes a `RankFailedError` (one line).
"""

from __future__ import annotations

import logging
import os

from moeplan.errors import RankFailedError


def launch(nproc: int, module: str, args: list[str]) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # CPU ranks share the host's cores
    os.environ.setdefault("LOGLEVEL", "ERROR")  # read by torchrun's logger when it is imported
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run as torchrun

    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    parsed = get_args_parser().parse_args(
        ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "--max-restarts", "0",
         "--monitor-interval", "0.2", "--module", module, *args])
    try:
        torchrun(parsed)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        why = "killed by a signal" if code < 0 else f"exit code {code}"
        raise RankFailedError(f"rank {rank} failed ({why}); the job was stopped on all {nproc} "
                              "ranks (see that rank's message above)",
                              exit_code=2 if code == 2 else 1) from None
