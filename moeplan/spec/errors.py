"""Typed exceptions for errors a user can cause; the CLI turns each into one line and exit code 2."""


def one_line(text: str) -> str:
    """`text` as one printable line: control characters a user's file put into a message (a
    key with a form feed, a newline in a name) are shown escaped, never acted on."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class MoeplanError(Exception):
    """Base class: a user-facing error whose message is one self-contained line."""


class UnknownNameError(MoeplanError):
    """A model or cluster name that is neither built in nor a readable file."""


class SpecError(MoeplanError):
    """A model, cluster or plan file that is malformed or inconsistent."""


class ConfigError(MoeplanError):
    """Options that contradict each other or the model/cluster (e.g. GPUs that do not divide)."""


class InfeasibleError(MoeplanError):
    """No parallel configuration fits the model on the cluster; the message says which term broke it."""


class RankFailedError(MoeplanError):
    """A rank of a launched job failed; the job was stopped. Exit code 2 when the rank refused its
    input (it said why on one line), 1 when it failed while running."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class CheckFailed(MoeplanError):
    """A check the user asked for did not pass (e.g. `validate --max-error`): exit code 1, the
    code a script or CI reads as a failed check rather than a bad input."""

    exit_code = 1


class Interrupted(MoeplanError):
    """The user stopped the job (Ctrl-C, SIGTERM): one line and exit code 130, as a shell
    reports an interrupted command."""

    exit_code = 130
