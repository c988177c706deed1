"""GradientPenalty(estimator="exact") against a float64 Jacobian: the penalty of every position's
distribution, summed, for logits with positions whose gradients involve other positions' inputs."""
import pytest
import torch
from torch import nn

import fastvat


class TokenMixer(nn.Module):
    """[B, T, H] -> [B, T, C] logits; every position's logits depend on every position's input."""

    def __init__(self, t=5, h=4, c=3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.mix = nn.Parameter(torch.randn(t, t, generator=g, dtype=torch.float64) / t ** 0.5)
        self.proj = nn.Parameter(torch.randn(h, c, generator=g, dtype=torch.float64))

    def forward(self, x):
        return torch.tanh(torch.einsum("ts,bsh->bth", self.mix, x)) @ self.proj


class Segmenter(nn.Module):
    """[N, 2, H, W] -> [N, 4, H, W] logits (classes in dim 1); 3x3 convolutions mix neighbouring pixels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(2, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 4, 3, padding=1)
        self.double()

    def forward(self, x):
        return self.conv2(torch.tanh(self.conv1(x)))


class Classifier(nn.Module):
    """[N, 6] -> [N, 3]: no positions."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()

    def forward(self, x):
        return self.net(x)


def truth(model, x, form, example_class_dim):
    """mean over examples of sum over every output o of one example of ||d o / d x_example||^2, where
    o is a logit (mse) or 2 sqrt(p) (kl) of one class at one position: the full Jacobian, per example."""
    def outputs(xi):
        f = model(xi.unsqueeze(0))[0]
        if form == "kl":
            f = 2.0 * torch.softmax(f, dim=example_class_dim).sqrt()
        return f

    total = 0.0
    for n in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(outputs, x[n])
        total += float((jac ** 2).sum())
    return total / x.shape[0]


# model, input shape, class_dim, the class dim of one example's logits
CASES = {
    "tokens [B, T, C]": (TokenMixer, (3, 5, 4), None, -1),
    "segmentation [N, C, H, W]": (Segmenter, (2, 2, 4, 5), 1, 0),
    "classes [N, C]": (Classifier, (4, 6), None, -1),
}


@pytest.mark.parametrize("form", ["kl", "mse"])
@pytest.mark.parametrize("case", list(CASES))
def test_exact_penalty_is_the_sum_over_positions(case, form):
    make, shape, class_dim, example_class_dim = CASES[case]
    model = make()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = fastvat.GradientPenalty(model, form=form, estimator="exact", class_dim=class_dim)(x)
    expected = truth(model, x, form, example_class_dim)
    assert got.dtype == torch.float64
    got = float(got.detach())
    assert abs(got - expected) <= 1e-10 * expected, (got, expected)


def test_exact_penalty_is_what_rademacher_estimates():
    """The two estimators estimate one quantity: the Rademacher mean over many draws comes close."""
    model = TokenMixer()
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = float(fastvat.GradientPenalty(model, estimator="exact")(x))
    est = float(fastvat.GradientPenalty(model, samples=2000, generator=torch.Generator().manual_seed(2))(x))
    assert abs(est - exact) < 0.05 * exact, (est, exact)


def test_exact_penalty_is_differentiable_and_empty_batch_is_zero():
    model = TokenMixer()
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fastvat.GradientPenalty(model, estimator="exact")(x).backward()
    assert model.mix.grad is not None and torch.isfinite(model.mix.grad).all() and model.mix.grad.abs().sum() > 0
    empty = fastvat.GradientPenalty(model, estimator="exact")(x[:0])
    assert float(empty) == 0.0
