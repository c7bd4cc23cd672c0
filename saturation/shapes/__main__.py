"""Entry point of ``python -m saturation.shapes``: bad input ends with one plain ``error:`` line."""

from .cli import main

main()
