"""`molt`: composes the commands; each lives in its own module and holds no logic."""
import os
import sys

import typer

from cli.cache import cache_app
from cli.datasets import datasets_app
from cli.demo import demo
from cli.extract import extract
from cli.predict import predict
from cli.robustness import robustness
from cli.sweep import sweep
from cli.train_heads import train_heads

app = typer.Typer(help="molt-cache: MoLT heads on frozen-encoder feature caches.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)


@app.callback()
def _logs_stay_readable() -> None:
    """molt-cache: MoLT heads on frozen-encoder feature caches."""
    # Off a terminal (a log file, a pipe), the Hugging Face libraries' tqdm bars ("Loading
    # weights", GGUF conversion) would write carriage-return redraws; they read this at import.
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


app.command("extract")(extract)
app.command("train-heads")(train_heads)
app.command("robustness")(robustness)
app.command("sweep")(sweep)
app.command("predict")(predict)
app.command("demo")(demo)
app.add_typer(datasets_app, name="datasets")
app.add_typer(cache_app, name="cache")

if __name__ == "__main__":
    app()
