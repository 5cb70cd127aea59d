"""``python -m safeckpt``: the same command as the ``safeckpt`` console script."""

from .cli import console

if __name__ == "__main__":
    console()
