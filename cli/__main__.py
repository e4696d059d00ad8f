"""`python -m cli`: the same app as the `molt` script, for a checkout that is not installed."""
from cli.main import app

if __name__ == "__main__":
    app(prog_name="molt")
