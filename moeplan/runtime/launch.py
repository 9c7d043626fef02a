"""Start ranks on this host: one process per rank, joined through a store that listens on
loopback only.

Shared by `moerun` and `moeplan profile`. torchrun's standalone mode would do the same job, but
its stores listen on every interface without authentication (and its rendezvous unpickles what
it reads), so a single-host job would be reachable from the network. Here the launcher owns the
store, bound to 127.0.0.1; the ranks join it as torchrun's workers join their agent's store
(`TORCHELASTIC_USE_AGENT_STORE`), and gloo and NCCL open their own sockets on loopback too. A
rank that fails stops the job at once (the others are stopped); the failure becomes a
`RankFailedError` (one line); Ctrl-C stops every rank and becomes `Interrupted`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta

from moeplan.spec.errors import Interrupted, RankFailedError

LAUNCHER_PID = "MOEPLAN_LAUNCHER_PID"  # the process whose death ends the ranks it started
LOOPBACK = "127.0.0.1"
POLL_S = 0.2  # how often the launcher looks at its ranks
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long


def die_with_launcher() -> None:
    """Called first in a rank. Linux: the kernel kills the rank when the process that started
    it dies (SIGKILL of `moerun` leaves no orphan training on and later writing its --out or
    --save); a launcher already gone before that was set ends the rank at once."""
    launcher = os.environ.get(LAUNCHER_PID)
    if not sys.platform.startswith("linux") or launcher is None:
        return
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(launcher):
        os._exit(1)


def take_ctrl_c_once() -> None:
    """Called first in a rank. Ctrl-C reaches a rank twice (from the terminal, to the whole
    process group, and passed on by the launcher): the first raises KeyboardInterrupt, the
    rest are ignored, so none lands in the rank's error handling or its shutdown."""
    def interrupt(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)


def loopback_store(world: int):
    """(store, port): a TCPStore served by this process on 127.0.0.1 (an ephemeral port),
    handed a socket bound there (it then owns it): the store's own server would listen on every
    interface."""
    import torch.distributed as dist

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, 0))
    listener.listen(max(128, world))
    port = listener.getsockname()[1]
    store = dist.TCPStore(LOOPBACK, port, world, True, timedelta(seconds=60),
                          wait_for_workers=False, master_listen_fd=listener.detach(),
                          use_libuv=True)
    return store, port


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
               LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0", ROLE_RANK=str(rank),
               MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port),
               TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="0")
    env.setdefault("OMP_NUM_THREADS", "1")  # CPU ranks share the host's cores
    if sys.platform.startswith("linux"):  # gloo's and NCCL's bootstrap sockets: loopback only
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    return env


def _stop(procs: list[subprocess.Popen], sig: int = signal.SIGTERM) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(nproc: int, module: str, args: list[str]) -> None:
    """Run `python -m module args` as ranks 0..nproc-1 of one job on this host; return when all
    succeeded."""
    os.environ[LAUNCHER_PID] = str(os.getpid())  # the ranks die with this process
    store, port = loopback_store(nproc)
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(nproc):
            procs.append(subprocess.Popen([sys.executable, "-u", "-m", module, *args],
                                          env=rank_env(rank, nproc, port)))
        while True:
            codes = [p.poll() for p in procs]
            # a rank killed by a signal is the cause; its peers fail after losing it
            failed = sorted(((c >= 0, r), c) for r, c in enumerate(codes) if c not in (None, 0))
            if failed:
                (_, rank), code = failed[0]
                _stop(procs)
                if code == 130 or code == -signal.SIGINT:  # the rank saw Ctrl-C first
                    raise KeyboardInterrupt
                why = "killed by a signal" if code < 0 else f"exit code {code}"
                raise RankFailedError(
                    f"rank {rank} failed ({why}); the job was stopped on all {nproc} ranks "
                    "(see that rank's message above)", exit_code=2 if code == 2 else 1)
            if all(c == 0 for c in codes):
                return
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        _stop(procs, signal.SIGINT)
        _stop(procs)
        raise Interrupted(f"interrupted; the job was stopped on all {nproc} ranks") from None
    finally:
        _stop(procs)
        del store
