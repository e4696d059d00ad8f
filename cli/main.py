"""`molt`: composes the commands; each lives in its own module and holds no logic."""
import typer

from cli.cache import cache_app
from cli.datasets import datasets_app
from cli.demo import demo
from cli.extract import extract
from cli.robustness import robustness
from cli.sweep import sweep
from cli.train_heads import train_heads

app = typer.Typer(help="molt-cache: MoLT heads on frozen-encoder feature caches.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
app.command("extract")(extract)
app.command("train-heads")(train_heads)
app.command("robustness")(robustness)
app.command("sweep")(sweep)
app.command("demo")(demo)
app.add_typer(datasets_app, name="datasets")
app.add_typer(cache_app, name="cache")

if __name__ == "__main__":
    app()
