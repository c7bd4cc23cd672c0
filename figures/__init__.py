"""Every plot of the toolkit, as pure functions of result tables (DataFrames or paths).

Nothing here imports ``saturation`` or ``routing``: a figure can be redrawn from files alone.
"""
