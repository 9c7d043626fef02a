"""Run a click command so that every user error is one line on stderr and exit code 2."""

from __future__ import annotations

import signal
import sys

import click

from moeplan.spec.errors import CheckFailed, Interrupted, MoeplanError, one_line


def run(cli: click.Command, prog: str) -> None:
    try:
        cli.main(prog_name=prog, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo(f"{prog}: aborted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.UsageError as e:
        ctx = f"{e.ctx.command_path}" if e.ctx else prog
        click.echo(f"{ctx}: error: {one_line(e.format_message())} (see --help)", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"{prog}: error: {one_line(e.format_message())}", err=True)
        sys.exit(2)
    except Interrupted as e:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C: no shutdown traceback
        click.echo(f"{prog}: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        click.echo(f"{prog}: interrupted", err=True)
        sys.exit(130)
    except CheckFailed as e:
        click.echo(f"{prog}: check failed: {one_line(str(e))}", err=True)
        sys.exit(e.exit_code)
    except MoeplanError as e:
        click.echo(f"{prog}: error: {one_line(str(e))}", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    except BrokenPipeError:
        sys.exit(1)
