"""Options that several commands share, declared once so their names and help agree."""

from __future__ import annotations

import click

UNSAFE_PICKLE_HELP = (
    "Fully unpickle an adapter_model.bin that the safe loader (torch.load with "
    "weights_only=True) refuses. Full unpickling can execute code hidden in the file: use it "
    "only for files you trust, or convert them to safetensors first.")

json_option = click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
unsafe_pickle_option = click.option("--allow-unsafe-pickle", is_flag=True, help=UNSAFE_PICKLE_HELP)


def force_option(what: str = "OUTPUT"):
    """``--force``: replace ``what`` when it exists (the old one is kept until the new one is complete)."""
    return click.option("--force", is_flag=True,
                        help=f"Replace {what} if it exists (kept until the new one is complete).")
