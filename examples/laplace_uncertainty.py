"""A Laplace approximation with the engine's Kronecker factors, and its predictive uncertainty.

A regression MLP fitted to noisy samples of ``sin(2x)`` on ``[-2, 2]``; laplace-torch's
``Laplace`` over all weights with ``hessian_structure="kron"`` (and ``"diag"``) and
:class:`secorder_hooks.integrations.laplace.SecorderGGN` as the curvature backend, the noise
level known (0.1), the prior precision fitted by the marginal likelihood. The predictive standard deviation of the
linearized model grows away from the data. Run ``python examples/laplace_uncertainty.py``
(needs ``laplace-torch`` and ``matplotlib``) to draw ``docs/images/laplace_uncertainty.png``;
``tests/integrations/test_laplace_backend.py`` runs it too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from laplace import Laplace
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from secorder_hooks.integrations.laplace import SecorderGGN

FIGURE = Path(__file__).resolve().parent.parent / "docs" / "images" / "laplace_uncertainty.png"


def fit(structure: str) -> tuple[Laplace, torch.Tensor, torch.Tensor]:
    """Train the MLP, fit the Laplace approximation of ``structure``; ``(la, x, y)``."""
    torch.manual_seed(0)
    x = torch.rand(64, 1) * 4 - 2
    y = torch.sin(2 * x) + 0.1 * torch.randn_like(x)
    model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    la = Laplace(
        model, "regression", subset_of_weights="all", hessian_structure=structure, sigma_noise=0.1, backend=SecorderGGN
    )
    la.fit(DataLoader(TensorDataset(x, y), batch_size=16))
    la.optimize_prior_precision(method="marglik")
    return la, x, y


def predictive(la: Laplace, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (linearized model plus observation noise) on ``grid`` ``[G, 1]``."""
    mean, var = la(grid, pred_type="glm")
    return mean.squeeze(-1), (var.squeeze(-1).squeeze(-1) + la.sigma_noise**2).sqrt()


def main(path: Path = FIGURE) -> dict[str, torch.Tensor]:
    """Draw the figure to ``path``; the standard deviations of both structures on the grid."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    grid = torch.linspace(-4, 4, 161).unsqueeze(1)
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=100)
    stds = {}
    for structure, color in (("kron", "tab:blue"), ("diag", "tab:orange")):
        la, x, y = fit(structure)
        with torch.no_grad():
            mean, std = predictive(la, grid)
        stds[structure] = std
        g = grid.squeeze(1)
        ax.fill_between(g, mean - 2 * std, mean + 2 * std, color=color, alpha=0.3, label=f"{structure}: mean ± 2 std")
    ax.plot(g, mean, color="tab:blue", lw=1.2, label="predictive mean (MAP)")
    ax.scatter(x.squeeze(1), y.squeeze(1), s=8, color="black", label="training data", zorder=3)
    ax.plot(grid.squeeze(1), torch.sin(2 * grid.squeeze(1)), color="gray", ls="--", lw=0.8, label="sin(2x)")
    ax.set_xlabel("x")
    ax.set_ylim(-3, 3)
    ax.legend(loc="lower left", fontsize=7)
    ax.set_title("Laplace predictive with SecorderGGN (laplace-torch)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return stds


if __name__ == "__main__":
    main()
