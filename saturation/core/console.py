"""The console side of every command, shared by the `saturation` and `routing` scripts and the ``python -m`` ones.

Bad input is one plain ``error:`` line: `friendly` turns a `ToolkitError` raised inside a command into that line
and exit 1, and `console_entry` turns click's own usage errors (an unknown option, a wrong type) into one line and
exit 2, where typer would print a usage line and a boxed panel.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import typer
from rich.console import Console
from rich.markup import escape

from saturation.core.errors import ToolkitError

err_console = Console(stderr=True)


def typer_app(help: str) -> typer.Typer:
    """A typer app as every entry point of the toolkit makes it: help on no arguments, no completion, no rich
    tracebacks (a traceback is a bug; bad input never shows one)."""
    return typer.Typer(help=help, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


class _LineTracker:
    """Stands in for ``sys.stderr`` during a command and remembers whether the last write ended a line.

    Progress bars (tqdm's, rich's) leave the cursor after their text; an error printed there would be glued to the
    bar. Only what goes through Python is seen, which is every bar and log line the toolkit and its libraries print.
    """

    def __init__(self, stream):
        self._stream = stream
        self.at_line_start = True

    def write(self, text: str) -> int:
        if text:
            self.at_line_start = text.endswith("\n")
        return self._stream.write(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str):  # isatty, flush, fileno, encoding ... of the real stream
        return getattr(self._stream, name)


def _fresh_line(tracker: _LineTracker) -> None:
    """Close every open tqdm bar (else it redraws itself after the error, at exit), then end a half-written line."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        tqdm = None
    for bar in list(getattr(tqdm, "_instances", ())):
        with contextlib.suppress(Exception):
            bar.close()
    if not tracker.at_line_start:
        tracker.write("\n")


def friendly(fn):
    """Turn `ToolkitError` into one red line on stderr, at the start of a line, and exit 1; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        real = sys.stderr
        tracker = sys.stderr = _LineTracker(real)
        try:
            return fn(*args, **kwargs)
        except ToolkitError as err:
            if getattr(err, "quiet", False):  # another rank of a torchrun run failed and printed the one line
                raise typer.Exit(1) from None
            _fresh_line(tracker)
            message = escape(" ".join(str(err).split()))  # one line, whatever the message holds; no markup in it
            err_console.print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            _fresh_line(tracker)
            err_console.print("[yellow]interrupted[/] (finished work is kept; rerun to resume)")
            raise typer.Exit(130) from None
        except Exception as err:  # a full disk anywhere (a figure, a log) is one line, not a traceback
            from saturation.core.files import disk_full_message, is_disk_full

            if not is_disk_full(err):
                raise
            _fresh_line(tracker)
            message = escape(disk_full_message(None, err))
            err_console.print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        finally:
            if sys.stderr is tracker:
                sys.stderr = real

    return wrapper


# click's base of every usage error; typer >= 0.2x vendors its own click, so reach it from typer's public class
CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def console_entry(app: typer.Typer):
    """The console script of `app`: click's own bad input (an unknown option or command, a value of the wrong
    type, a missing value) becomes one `error:` line naming the command's --help and exit 2, as the toolkit's own
    errors are one line (typer would print a usage line and a boxed panel)."""

    def main(args: list[str] | None = None) -> None:
        try:
            code = app(args=args, standalone_mode=False)  # typer.Exit (friendly's exit 1, --help's 0) returns its code
        except CLICK_ERROR as err:
            if type(err).__name__ == "NoArgsIsHelpError":  # no arguments: the help is already printed (typer's test)
                sys.exit(err.exit_code)
            ctx = getattr(err, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            message = escape(" ".join(err.format_message().split()) + hint)
            err_console.print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)
            sys.exit(err.exit_code)
        except typer.Abort:
            err_console.print("[yellow]aborted[/]")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    return main


