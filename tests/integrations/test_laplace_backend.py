"""The laplace-torch backends against laplace's BackPackGGN and CurvlinopsGGN (float64; skipped without laplace)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

laplace = pytest.importorskip("laplace")
from laplace.curvature import BackPackGGN, CurvlinopsEF, CurvlinopsGGN  # noqa: E402

import secorder_hooks as sh  # noqa: E402
from secorder_hooks.integrations.laplace import SecorderEF, SecorderGGN  # noqa: E402
from tests.support import reference  # noqa: E402

TOL = {"atol": 1e-6, "rtol": 1e-6}
ROOT = Path(__file__).resolve().parents[2]


class Residual(nn.Module):
    """Conv stem, a residual block with ``out += identity`` and in-place ReLU (which BackPACK cannot take)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        h = self.relu(self.stem(x))
        out = self.conv2(self.relu(self.conv1(h)))
        out += h
        return self.head(self.relu(out).flatten(1))


class BatchNormCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


class EmbeddingModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens)).mean(1))


def problem(name):
    torch.manual_seed(0)
    n = 12
    if name == "mlp_classifier":
        model, x = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), torch.randn(n, 4)
    elif name == "mlp_regression":
        model, x = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)), torch.randn(n, 3)
    elif name == "residual_cnn":
        model, x = Residual(), torch.randn(n, 1, 4, 4)
    elif name == "batchnorm_cnn":
        model, x = BatchNormCNN(), torch.randn(n, 1, 4, 4)
        with torch.no_grad():
            model.bn.running_mean.uniform_(-0.5, 0.5)
            model.bn.running_var.uniform_(0.5, 1.5)
            model.bn.weight.uniform_(0.5, 1.5)
    else:
        model, x = EmbeddingModel(), torch.randint(0, 7, (n, 5))
    model = model.double().eval()
    x = x.double() if x.is_floating_point() else x
    with torch.no_grad():
        out = model(x)
    regression = name == "mlp_regression"
    y = torch.randn_like(out) if regression else torch.randint(0, 3, (n,))
    return model, x, y, "regression" if regression else "classification"


def fitted(name, structure, backend, **kwargs):
    model, x, y, likelihood = problem(name)
    kwargs.setdefault("subset_of_weights", "all")
    la = laplace.Laplace(model, likelihood, hessian_structure=structure, backend=backend, **kwargs)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=5))  # three batches of 5, 5, 2: the M / N rescaling
    return la, x


def precision(la):
    p = la.posterior_precision
    return p if isinstance(p, torch.Tensor) else p.to_matrix()


def predictive(la, x):
    if la.likelihood == "regression":
        mean, var = la(x, pred_type="glm")
        return torch.cat([mean.flatten(), var.flatten()])
    return la(x, pred_type="glm", link_approx="probit")


def assert_agree(ours, theirs, x):
    torch.testing.assert_close(precision(ours), precision(theirs), **TOL)
    torch.testing.assert_close(ours.loss, theirs.loss, **TOL)
    torch.testing.assert_close(predictive(ours, x), predictive(theirs, x), **TOL)


@pytest.mark.parametrize("structure", ["diag", "kron"])
@pytest.mark.parametrize("name", ["mlp_classifier", "mlp_regression"])
def test_agrees_with_backpack_and_curvlinops(name, structure):
    ours, x = fitted(name, structure, SecorderGGN)
    for backend in (BackPackGGN, CurvlinopsGGN):
        theirs, _ = fitted(name, structure, backend)
        assert_agree(ours, theirs, x)
    log = ours.log_marginal_likelihood(torch.tensor(1.3, dtype=torch.float64))
    assert torch.isfinite(log)


@pytest.mark.parametrize("structure", ["diag", "kron"])
@pytest.mark.parametrize("name", ["mlp_classifier", "mlp_regression"])
def test_last_layer_laplace_agrees(name, structure):
    """laplace's default subset_of_weights='last_layer'."""
    ours, x = fitted(name, structure, SecorderGGN, subset_of_weights="last_layer")
    for backend in (BackPackGGN, CurvlinopsGGN):
        theirs, _ = fitted(name, structure, backend, subset_of_weights="last_layer")
        assert_agree(ours, theirs, x)


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_residual_cnn_agrees_with_curvlinops(structure):
    """BackPACK's backend cannot take the in-place residual add; curvlinops' can, and agrees."""
    with pytest.raises(RuntimeError, match="modified inplace"):  # its module backward hooks and `out += h`
        fitted("residual_cnn", structure, BackPackGGN)
    ours, x = fitted("residual_cnn", structure, SecorderGGN)
    theirs, _ = fitted("residual_cnn", structure, CurvlinopsGGN)
    assert_agree(ours, theirs, x)


@pytest.mark.parametrize("name", ["mlp_classifier", "mlp_regression"])
def test_empirical_fisher_agrees_with_curvlinops(name):
    for structure in ("diag", "kron"):
        ours, x = fitted(name, structure, SecorderEF)
        theirs, _ = fitted(name, structure, CurvlinopsEF)
        assert_agree(ours, theirs, x)


def summed_ce(f, y):
    return nn.functional.cross_entropy(f, y, reduction="sum")


def brute_force_kron(model, module, x, y):
    r"""The KFLR factors ``(A, B)`` of ``module.weight`` on the whole data set, from Jacobians alone.

    With :math:`a_{nt}` the layer input at position :math:`t` (read off the Jacobian of the
    layer output with respect to its weight), :math:`J_{nt}` the Jacobian of the model
    output of example :math:`n` with respect to the layer output at :math:`t` and
    :math:`H_n` the Hessian of the summed cross-entropy with respect to :math:`f_n`:
    :math:`A = \frac{1}{NT} \sum_{n,t} a_{nt} a_{nt}^\top`,
    :math:`B = \sum_{n,t} J_{nt}^\top H_n J_{nt}` (expand), what laplace's ``kron`` is after
    the factors of all batches are added (the input factors weighted by ``M / N``).
    """
    seen = {}

    def hook(m, inputs, out):
        eps = torch.zeros_like(out, requires_grad=True)
        seen.update(input=inputs[0], eps=eps)
        return out + eps

    handle = module.register_forward_hook(hook)
    try:
        f = model(x)
    finally:
        handle.remove()
    n, classes = f.shape
    jac_out = torch.stack(  # [C, *z]: row n holds d f_nc / d z_n (eval mode: examples do not mix)
        [torch.autograd.grad(f[:, c].sum(), seen["eps"], retain_graph=True)[0] for c in range(classes)]
    )
    w = module.weight.detach()
    jac_w = torch.func.jacrev(lambda v: torch.func.functional_call(module, {"weight": v}, (seen["input"],)))(w)
    if isinstance(module, nn.Linear):  # z [N, O], W [O, I]
        a, jac_out = jac_w[:, 0, 0, :].unsqueeze(1), jac_out.unsqueeze(2)
    elif isinstance(module, nn.Conv2d):  # z [N, O, H, W], W [O, C, kh, kw]
        a = jac_w[:, 0, :, :, 0].reshape(n, -1, w[0].numel())
        jac_out = jac_out.flatten(3).transpose(2, 3)  # [C, N, T, O]
    else:  # embedding: z [N, T, D], W [V, D]; a is the one-hot token
        a = jac_w[:, :, 0, :, 0]
    h = torch.func.hessian(lambda out: summed_ce(out, y))(f.detach())
    h = h[torch.arange(n), :, torch.arange(n), :]  # [N, C, C]
    big_a = torch.einsum("nti,ntj->ij", a, a) / (a.shape[0] * a.shape[1])
    big_b = torch.einsum("cnto,nck,knts->os", jac_out, h, jac_out)
    return big_a, big_b


@pytest.mark.parametrize("name", ["batchnorm_cnn", "embedding"])
def test_kron_works_where_laplace_backends_fail(name):
    """BatchNorm (eval) gets the exact diagonal of its GGN block, Embedding Kronecker factors (input first).

    Every installed laplace backend's ``kron`` fails on both models (AsdlGGN needs
    asdfghjkl, not installed); ours is checked against the brute-force factors of
    :func:`brute_force_kron` and the brute-force GGN diagonal.
    """
    for backend in (BackPackGGN, CurvlinopsGGN):
        with pytest.raises(Exception):  # noqa: B017 (each fails in its own way)
            fitted(name, "kron", backend)
    ours, x = fitted(name, "kron", SecorderGGN)
    assert torch.isfinite(predictive(ours, x)).all()
    model, x, y, _ = problem(name)
    torch.testing.assert_close(ours.loss, summed_ce(model(x), y).detach(), **TOL)
    diagonal = reference.ggn_diagonal(model, summed_ce, x, y)
    kfacs = ours.H_facs.kfacs  # the factors added over the batches, before decomposition
    params = [
        (f"{m}.{p}", module, p) for m, module in model.named_modules() for p, _ in module.named_parameters("", False)
    ]
    assert len(kfacs) == len(params)
    for (key, module, param), got in zip(params, kfacs):
        if isinstance(module, nn.BatchNorm2d):
            (block,) = got
            torch.testing.assert_close(block, torch.diag(diagonal[key].flatten()), **TOL, msg=key)
            continue
        a, b = brute_force_kron(model, module, x, y)
        if param == "bias":
            (got_b,) = got
            torch.testing.assert_close(got_b, b, **TOL, msg=key)
        elif isinstance(module, nn.Embedding):
            torch.testing.assert_close(got[0], a, **TOL, msg=key)
            torch.testing.assert_close(got[1], b, **TOL, msg=key)
        else:
            torch.testing.assert_close(got[0], b, **TOL, msg=key)
            torch.testing.assert_close(got[1], a, **TOL, msg=key)


def test_grouped_convolution_is_refused_in_kron():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(16, 3)).double()
    x, y = torch.randn(6, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    la = laplace.Laplace(model, "classification", "all", hessian_structure="kron", backend=SecorderGGN)
    with pytest.raises(sh.UnsupportedModuleError, match="grouped convolution"):
        la.fit(DataLoader(TensorDataset(x, y), batch_size=6))


def test_stochastic_backend_samples_b_only():
    """stochastic=True: KFAC / DiagGGNMC; the input factors are the exact ones, B is unbiased."""
    model, x, y, _ = problem("mlp_classifier")
    exact, sampled = SecorderGGN(model, "classification"), SecorderGGN(model, "classification", stochastic=True)
    _, k_exact = exact.kron(x, y, N=len(y))
    torch.manual_seed(0)
    draws = [sampled.kron(x, y, N=len(y))[1] for _ in range(48)]
    for i, factors in enumerate(k_exact.kfacs):
        if len(factors) == 2:
            for k in draws[:3]:
                torch.testing.assert_close(k.kfacs[i][1], factors[1])
        b = torch.stack([k.kfacs[i][0] for k in draws])
        error = (b.mean(0) - factors[0]).abs()
        assert (error <= 5 * b.std(0) / len(draws) ** 0.5 + 1e-12).all()
    _, h = sampled.diag(x, y)
    assert h.shape == (sum(p.numel() for p in model.parameters()),)
    assert all(p.grad is None for p in model.parameters())  # the backend leaves .grad alone


def test_docs_example_script_draws_a_widening_predictive(tmp_path):
    """examples/laplace_uncertainty.py (the worked example of docs/kronecker.rst) and its figure."""
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("laplace_uncertainty", ROOT / "examples" / "laplace_uncertainty.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    stds = script.main(tmp_path / "figure.png")
    assert (tmp_path / "figure.png").stat().st_size > 10_000
    kron = stds["kron"]  # on linspace(-4, 4, 161): the data cover [-2, 2], indices 40 to 120
    assert kron[:20].min() > 3 * kron[40:121].max() and kron[-20:].min() > 3 * kron[40:121].max()
    assert (kron >= 0.1).all()  # at least the noise level
