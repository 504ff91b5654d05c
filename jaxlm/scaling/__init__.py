"""Scaling laws: Chinchilla's three approaches to the compute-optimal frontier and Kaplan et al. 2020's laws, with
bootstrap intervals.

Approach 1 (`fit_envelope`): the envelope of minimum loss over training curves against compute C = 6ND.
Approach 2 (`fit_isoflop`): a parabola in log N per compute budget; the optima follow N_opt = k C^a.
Approach 3 (`fit_parametric`): L(N, D) = E + A / N^alpha + B / D^beta, fitted as Besiroglu et al. 2024 (Epoch AI)
refitted Hoffmann et al. 2022: a Huber loss on log L, summed over points, minimised by L-BFGS from a grid of starts.
Kaplan (`fit_power_law`, `fit_kaplan`): L(N) = (N_c/N)^alpha_N, L(D) = (D_c/D)^alpha_D and L(N, D) =
[(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D, least squares on log L; `lower_envelope` picks the runs that stand
for L(N) or L(D) in a sweep.

Sweeps: `isoflop_grid` declares the runs of an IsoFLOP sweep as Experiments (`budget_grid` also maps each member to
its budget), `wsd_branches` the runs of one model size under the warmup-stable-decay schedule (Hägele et al. 2024),
and `collect_results` reads finished runs back into a table (`write_csv`, `read_csv`). An IsoFLOP sweep
module's main is `jaxlm.cli.run_isoflop_sweep`: it refuses overrides that move a member off its budget
(`check_budgets`, by `member_flops`), trains the members selected, and once they are `all_finished` fits and plots
them with `fit_and_plot`, which is also what `python -m tools.fit_scaling` runs.

Every fit validates its input and raises `ScalingError` (a `JaxlmError`) naming the budget, column or row at fault;
a fit that does not converge raises rather than returning numbers.

Hyperparameter searches (`search`): `grid_search` and seeded `random_search` over any config fields, and a report
by final validation loss. Sweeps on Ray (`cluster`; Ray is imported only when a sweep asks for it): each member in
a process of its own with its own devices.

Modules: `parametric` (approach 3), `kaplan` (Kaplan's laws), `lbfgs` (the vectorised L-BFGS both use),
`isoflop` (approach 2), `envelope` (approach 1), `sweeps` (declaring and checking sweeps), `search`
(hyperparameter searches), `cluster` (sweeps on Ray), `status` (a sweep's record of its members), `results`
(reading runs and results tables), `report` (fitting a sweep or table and plotting the fits); `_common` holds
`ScalingError` and the checks the fits share.
"""

from jaxlm.scaling._common import ScalingError
from jaxlm.scaling.envelope import Curve, EnvelopeFit, fit_envelope
from jaxlm.scaling.isoflop import IsoflopFit, fit_isoflop, group_budgets
from jaxlm.scaling.kaplan import KaplanFit, PowerLawFit, fit_kaplan, fit_power_law, lower_envelope
from jaxlm.scaling.parametric import ParametricFit, fit_parametric
from jaxlm.scaling.report import fit_and_plot
from jaxlm.scaling.results import COLUMNS, EPOCH_COLUMNS, collect_curves, collect_results, read_csv, read_run, write_csv
from jaxlm.scaling.sweeps import (
    AspectRatioShapes,
    all_finished,
    branch_from_trunk,
    budget_grid,
    check_budgets,
    cooldown_start,
    isoflop_grid,
    member_flops,
    reshape_model,
    wsd_branches,
)

__all__ = [
    "COLUMNS",
    "EPOCH_COLUMNS",
    "AspectRatioShapes",
    "Curve",
    "EnvelopeFit",
    "IsoflopFit",
    "KaplanFit",
    "ParametricFit",
    "PowerLawFit",
    "ScalingError",
    "all_finished",
    "branch_from_trunk",
    "budget_grid",
    "check_budgets",
    "collect_curves",
    "collect_results",
    "cooldown_start",
    "fit_and_plot",
    "fit_envelope",
    "fit_isoflop",
    "fit_kaplan",
    "fit_parametric",
    "fit_power_law",
    "group_budgets",
    "isoflop_grid",
    "lower_envelope",
    "member_flops",
    "read_csv",
    "read_run",
    "reshape_model",
    "write_csv",
    "wsd_branches",
]
