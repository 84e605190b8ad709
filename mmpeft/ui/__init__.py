"""`mmpeft ui`: a local web workbench over a runs folder (Gradio; `pip install 'mmpeft[ui]'`).

catalog.py reads run, grid and continual folders; compare.py puts their numbers side by side; launch.py checks and
starts recipes as detached CLI processes; app.py is the Gradio page over them. Nothing else imports this package
except the CLI's `ui` command.
"""

from __future__ import annotations

import sys


def serve(runs_dir="runs", host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Start the workbench; see mmpeft.ui.app.serve."""
    try:
        import gradio  # noqa: F401
    except ImportError:  # a user error: one line and exit code 2, as the CLI's others
        print("error: mmpeft ui needs Gradio: pip install 'mmpeft[ui]'", file=sys.stderr)
        raise SystemExit(2) from None
    from mmpeft.ui.app import serve as _serve

    return _serve(runs_dir, host=host, port=port, block=block)
