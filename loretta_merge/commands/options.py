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


METHOD_HELP = ("How the adapters' deltas combine, tensor by tensor: linear (sum of w_i * delta_i), "
               "task_arithmetic, ties, magnitude_prune, breadcrumbs, breadcrumbs_ties, dare_linear, "
               "dare_ties, della, della_linear (mergekit's definitions), or PEFT's own: svd, "
               "ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd "
               "(docs/merge-methods.md). Default linear.")

_METHOD_PARAM_OPTIONS = (
    click.option("--density", type=float, default=None,
                 help="Fraction of each delta kept, in (0, 1] (ties, dare_*, della*, "
                      "magnitude_prune, breadcrumbs*, *_svd). Default 1."),
    click.option("--lambda", "lambda_", type=float, default=None,
                 help="Scale of the combined delta, >= 0 (mergekit's methods but linear). "
                      "Default 1."),
    click.option("--epsilon", type=float, default=None,
                 help="della*: keep probabilities spread density +/- epsilon by magnitude rank. "
                      "Default 0.15."),
    click.option("--gamma", type=float, default=None,
                 help="breadcrumbs*: fraction of largest entries dropped as outliers. "
                      "Default 0.01."),
    click.option("--majority-sign", type=click.Choice(["total", "frequency"]), default=None,
                 help="ties, dare_ties, della, breadcrumbs_ties, ties_svd, dare_ties_svd: elect "
                      "each entry's sign by the sum of the deltas (total) or by their sign count "
                      "(frequency). Default total."),
    click.option("--normalize/--no-normalize", default=None,
                 help="Divide the combined delta by the sum of the (agreeing) weights. Default: "
                      "on for ties and della, off for the others."),
    click.option("--rescale/--no-rescale", default=None,
                 help="Scale each pruned delta back to its L1 norm before pruning. Default: on "
                      "for dare_* and della*, off for the others."),
    click.option("--tie-break", type=click.Choice(["mergekit", "first"]), default=None,
                 help="ties, magnitude_prune, breadcrumbs*: which of equal magnitudes at the "
                      "cut are kept: the ones mergekit's sort keeps (mergekit, the default; "
                      "sorts that tensor) or the first in memory order (first; no sort)."),
    click.option("--seed", type=int, default=None,
                 help="Seed of the random masks (dare_*, della*, dare_*_svd; required there): "
                      "the same seed gives the same bytes."),
)


def method_param_options(fn):
    """The merge method's parameters and ``--seed``, as ``merge`` and ``combine`` take them
    (``--method`` itself is declared by each command)."""
    for option in reversed(_METHOD_PARAM_OPTIONS):
        fn = option(fn)
    return fn


def method_params(density, lambda_, epsilon, gamma, majority_sign, normalize, rescale,
                  tie_break) -> dict:
    """The options above as ``methods.Method.resolve`` takes them (None: not given)."""
    return {"density": density, "lambda": lambda_, "epsilon": epsilon, "gamma": gamma,
            "majority_sign": majority_sign, "normalize": normalize, "rescale": rescale,
            "tie_break": tie_break}


def rank_rule_options(*, rank: str, energy: str, eps: str):
    """``--rank`` / ``--energy`` / ``--eps``: how ``extract`` and ``convert resize`` choose
    each module's rank (:mod:`loretta_merge.converters.lowrank`); the help is each command's."""
    options = (click.option("--rank", type=int, default=None, help=rank),
               click.option("--energy", type=float, default=None, help=energy),
               click.option("--eps", type=float, default=None, help=eps))

    def apply(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return apply
