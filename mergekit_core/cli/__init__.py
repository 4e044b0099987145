"""The `mk` command: builds a plugin host, lets plugins add commands, turns errors into one line.

Expected errors (:class:`MergekitError`) print ``Error: ...`` (and ``hint: ...``) on stderr and
exit with status 2 (usage, config) or 1 (runtime). ``MK_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence

import typer

from mergekit_core.errors import MergekitError, MkDeprecationWarning, UsageError
from mergekit_core.plugins import PluginHost

HELP = (
    "Merge fine-tuned models and PEFT adapters of one base model into one model.\n\n"
    "Methods, transforms, lambda policies, optimizers, evaluators and search strategies come "
    "from plugins: 'mk plugins list' shows what is installed, 'mk plugins show NAME' how to "
    "use one."
)


def _version(value: bool) -> None:
    if value:
        from mergekit_core.version import __version__

        typer.echo(f"mk (mergekit-core) {__version__}")
        raise typer.Exit()


def build_app(host: PluginHost) -> typer.Typer:
    """The Typer app for one host: the core's command groups plus every plugin's."""
    from mergekit_core.cli import config_cmd, evaluate_cmd, inspect_cmd, merge_cmd, plugins_cmd

    app = typer.Typer(
        name="mk",
        help=HELP,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def _root(
        version: bool = typer.Option(
            False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ) -> None:
        """Merge fine-tuned models and PEFT adapters of one base model into one model."""

    merge_cmd.register(app, host)
    inspect_cmd.register(app, host)
    evaluate_cmd.register(app, host)
    app.add_typer(plugins_cmd.make_app(host), name="plugins")
    config_cmd.register(app, host)
    host.register_commands(app)
    _plain_flags()
    return app


def _plain_flags() -> None:
    """Show on/off flags (``--json``, ``--force``, ``--help``) without a ``<bool>`` type in
    ``--help``, so they do not look like options that take a value (typer 0.2x prints one)."""
    try:
        from typer.core import TyperOption
    except ImportError:  # another typer layout: its own help stays as it is
        return
    shown = TyperOption.display_type_rich
    if getattr(shown, "_mk_plain_flags", False):
        return

    def display_type_rich(self: TyperOption, ctx: object) -> str | None:
        if getattr(self, "is_flag", False) and not getattr(self, "count", False) and self.metavar is None:
            return None
        return shown(self, ctx)

    display_type_rich._mk_plain_flags = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


def report_error(error: MergekitError) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    console.print(f"[bold red]Error:[/] {escape(error.message)}")
    if error.hint:
        console.print(f"[yellow]hint:[/] {escape(error.hint)}")


COMMAND_LINE_ERROR: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
"""The command-line parser's base error (click's ``ClickException``, as typer ships it)."""

_default_showwarning = warnings.showwarning
_shown: set[str] = set()


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: object = None, line: str | None = None) -> None:
    """Deprecations as one ``warning:`` line on stderr; other warnings as Python shows them."""
    if issubclass(category, MkDeprecationWarning):
        if str(message) not in _shown:  # a config read twice warns once
            _shown.add(str(message))
            print(f"warning: {message}", file=sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


def quiet_idle_threads() -> None:
    """Let torch's OpenMP threads sleep between parallel regions instead of spinning
    (``OMP_WAIT_POLICY=PASSIVE``), unless the user set the variable. The merge kernels run their
    own worker threads between torch's parallel operations; spinning OpenMP threads took the cores
    from them (TIES on 2 cores: 30% less wall time, ``benchmarks/merge_speed.py``). Takes effect
    only before torch is imported."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


YOUNG_COLLECTION_THRESHOLD = 100_000


def fewer_collections() -> None:
    """Run Python's cyclic garbage collector less often in this process: with the default
    threshold (a collection every 700 new objects, and full ones as the heap grows) importing
    torch spends much of its time in collections of its own long-lived objects. Cycles are still
    collected, every ``YOUNG_COLLECTION_THRESHOLD`` new objects."""
    import gc

    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])


_terminated = False


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler stopping a job, ``docker stop``) raised in the main thread,
    so a command stops as it does on Ctrl-C (a ``KeyboardInterrupt``: hidden temporaries removed,
    nothing half-written), with exit status 143."""


def stop_cleanly_on_sigterm() -> None:
    """Turn the first SIGTERM into :class:`Terminated` (a second one kills at once), unless the
    process was started with another SIGTERM disposition than the default."""
    import signal

    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def terminated(signum: int, frame: object) -> None:
        global _terminated
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _terminated = True
        raise Terminated()

    signal.signal(signal.SIGTERM, terminated)


def console_main() -> None:
    """The ``mk`` executable: :func:`main` with the settings that belong to a process of its own
    (`quiet_idle_threads`, `fewer_collections`, `stop_cleanly_on_sigterm`), and at exit the
    objects that exist frozen (``gc.freeze``): the interpreter's last collection then skips them,
    and nothing is left uncollected that the exit would not free anyway. Importing torch in a
    fresh process: 1.75 s, with fewer collections and the freeze 1.39 s (``benchmarks/
    merge_speed.py --child import-torch`` and ``import-torch-mk``, medians of 5, alternating)."""
    import gc

    quiet_idle_threads()
    fewer_collections()
    stop_cleanly_on_sigterm()
    try:
        main()
    finally:
        gc.freeze()


def main(argv: Sequence[str] | None = None, host: PluginHost | None = None) -> None:
    """The ``mk`` command line run in this process (``argv``: the arguments; None: ``sys.argv``);
    always ends with SystemExit. Process-wide settings are :func:`console_main`'s."""
    debug = os.environ.get("MK_DEBUG", "") not in ("", "0")
    try:
        _shown.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("always", MkDeprecationWarning)
            warnings.showwarning = _show_warning
            host = host if host is not None else PluginHost()
            app = build_app(host)
            code = app(args=list(argv) if argv is not None else None, prog_name="mk", standalone_mode=False)
        if _terminated:  # typer turns the interrupt into status 130
            raise Terminated()
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Abort:
        print("Aborted.", file=sys.stderr)
        sys.exit(1)
    except COMMAND_LINE_ERROR as error:  # bad flags or arguments: one line, like every other error
        if type(error).__name__ == "NoArgsIsHelpError":  # the help is printed already
            sys.exit(0)
        if debug:
            raise
        context = getattr(error, "ctx", None)
        where = context.command_path if context is not None else "mk"
        report_error(UsageError(error.format_message(), hint=f"see '{where} --help'"))
        sys.exit(2)
    except MergekitError as error:
        if debug:
            raise
        report_error(error)
        sys.exit(error.exit_code)
    except KeyboardInterrupt as stop:
        if debug:
            raise
        terminated = isinstance(stop, Terminated)
        print("Terminated." if terminated else "Interrupted.", file=sys.stderr)
        sys.exit(128 + 15 if terminated else 130)
    except OSError as error:  # the machine, not the input: a full disk, a permission, a vanished file
        if debug:
            raise
        report_error(os_error(error))
        sys.exit(1)


def os_error(error: OSError) -> MergekitError:
    """An operating-system failure as one line naming the file and what to do."""
    import errno

    where = error.filename or "a file"
    hints = {
        errno.ENOSPC: "free disk space (or write elsewhere) and run again; nothing was left half-written",
        errno.EDQUOT: "free space within your disk quota and run again; nothing was left half-written",
        errno.EACCES: "check the permissions, or choose another path",
        errno.EPERM: "check the permissions, or choose another path",
        errno.EROFS: "the file system is read-only: write elsewhere",
    }
    reason = error.strerror or type(error).__name__
    return MergekitError(f"{where}: {reason}", hint=hints.get(error.errno or 0, "MK_DEBUG=1 shows the traceback"))
