"""The ``cxrtool`` command line: one thin module per subcommand over the library."""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from cxrtool import __version__


class _Commands(TyperGroup):
    """The command group: an output that cannot be written ends any command with one line
    naming the path and the reason, and exit status 3 (``cxrtool.errors.OutputError``); an
    engine that stops under a run (``cxrtool.errors.EngineError``), with one line and 1."""

    def invoke(self, ctx):
        from cxrtool.errors import EXIT_ENGINE, EXIT_OUTPUT, EngineError, OutputError

        try:
            return super().invoke(ctx)
        except OutputError as error:
            typer.echo(f"error: cannot write the results: {error}", err=True)
            raise typer.Exit(EXIT_OUTPUT) from None
        except EngineError as error:
            typer.echo(f"error: {error}; what was done is written: run the same command again to do the rest", err=True)
            raise typer.Exit(EXIT_ENGINE) from None


app = typer.Typer(
    cls=_Commands,
    name="cxrtool",
    help="Chest X-ray AI from the command line: read real studies, train, predict, explain, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cxrtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """Chest X-ray AI from the command line."""


def _register() -> None:
    from cxrtool.cli import demo, evaluate, explain, models, predict, radiomics, train

    app.command("demo")(demo.demo)
    app.command("train")(train.train)
    app.command("predict")(predict.predict)
    app.command("explain", cls=explain.BareCamCommand)(explain.explain)
    app.command("radiomics")(radiomics.radiomics)
    app.command("evaluate")(evaluate.evaluate)
    app.add_typer(models.app, name="models")


_register()


def main() -> None:
    app()
