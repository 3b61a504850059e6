"""Model soups (fusedmerge/soups.py): the greedy soup equals a straightforward implementation of the paper's
algorithm (mlfoundations/model-soups main.py), score ties included, bit for bit on every backend; the
learned soup's gradients equal autograd through the plain softmax-weighted sum, and training lowers the loss."""

import copy

import pytest
import torch
from torch import nn

from conftest import CPU_BACKENDS, same_bits
from fusedmerge import LearnedSoup, fit_learned_soup, greedy_soup

N = 7
SCORES = [-9.0, -8.0, -8.0, -11.0, -7.0, -8.0, -9.0]  # ties among the ingredients' own scores


def _ingredients(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g)} for _ in range(N)]


def _target():
    return torch.randn(6, 5, generator=torch.Generator().manual_seed(42)) * 0.3


def _evaluate(sd):
    """A held-out score with coarse steps, so that candidates often tie with the soup's score."""
    return float(torch.floor(-8 * (sd["w"] - _target()).norm() / 6))


def _straightforward(ingredients, evaluate, scores):
    order = sorted(range(len(ingredients)), key=lambda i: scores[i], reverse=True)
    soup = {k: v.clone() for k, v in ingredients[order[0]].items()}
    taken, best, ties = [order[0]], scores[order[0]], 0
    for i in order[1:]:
        n = len(taken)
        candidate = {k: soup[k].clone() * (n / (n + 1.0)) + ingredients[i][k].clone() * (1.0 / (n + 1)) for k in soup}
        score = evaluate(candidate)
        ties += score == best
        if score > best:
            soup, best = candidate, score
            taken.append(i)
    return soup, taken, best, ties


@pytest.mark.parametrize("backend", ["torch"] + CPU_BACKENDS)
def test_greedy_soup_equals_straightforward(backend):
    ingredients = _ingredients()
    want, taken, best, ties = _straightforward(ingredients, _evaluate, SCORES)
    assert ties > 0 and 1 < len(taken) < N  # the case of a tie (rejected) and of both outcomes is exercised
    got = greedy_soup(ingredients, _evaluate, SCORES, backend=backend, show_progress=False)
    assert got.taken == taken and got.score == best and got.scores == SCORES
    for k in want:
        assert same_bits(got.soup[k], want[k]), k
    assert all(same_bits(a[k], b[k]) for a, b in zip(ingredients, _ingredients()) for k in a)  # inputs untouched


def test_greedy_soup_modules_loaders_and_own_scores():
    """Modules given as loaders (one loaded at a time), scores computed by `evaluate`: same soup."""
    ingredients = _ingredients(1)
    own = [_evaluate(sd) for sd in ingredients]
    want, taken, _, _ = _straightforward(ingredients, _evaluate, own)

    def module(sd):
        m = nn.Linear(6, 5)
        m.load_state_dict({"weight": sd["w"].T.contiguous(), "bias": sd["b"]})
        return m

    def evaluate(m):
        return _evaluate({"w": m.weight.detach().T, "b": m.bias.detach()})

    got = greedy_soup([lambda sd=sd: module(sd) for sd in ingredients], evaluate, show_progress=False)
    assert isinstance(got.soup, nn.Linear) and got.taken == taken and got.scores == own
    assert same_bits(got.soup.weight.detach().T, want["w"]) and same_bits(got.soup.bias.detach(), want["b"])


def test_greedy_soup_refusals():
    with pytest.raises(ValueError, match="ingredients is empty"):
        greedy_soup([], _evaluate)
    with pytest.raises(ValueError, match="scores has 2 entries"):
        greedy_soup(_ingredients(), _evaluate, [1.0, 2.0])
    with pytest.raises(TypeError, match="evaluate must return a number"):
        greedy_soup(_ingredients(), lambda sd: "high")


def _nets(n=3):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    nets = []
    for _ in range(n):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        nets.append(m)
    return nets


@pytest.mark.parametrize("per_layer", [True, False])
def test_learned_soup_gradients_equal_plain_autograd(per_layer):
    nets = _nets()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    soup = LearnedSoup(nets, per_layer=per_layer)
    with torch.no_grad():
        soup.merge_weight.copy_(torch.randn(soup.merge_weight.shape, generator=torch.Generator().manual_seed(3)))
    torch.nn.functional.cross_entropy(soup(x), y).backward()
    raw = soup.merge_weight.detach().clone().requires_grad_(True)
    beta = torch.ones((), requires_grad=True)
    alpha = raw.softmax(0)
    names = [k for k, _ in nets[0].named_parameters()]
    alpha = alpha[:, None].expand(-1, len(names)) if alpha.dim() == 1 else alpha
    params = {k: sum(alpha[i, j] * dict(m.named_parameters())[k].detach() for i, m in enumerate(nets))
              for j, k in enumerate(names)}
    torch.nn.functional.cross_entropy(beta * torch.func.functional_call(nets[0], params, (x,)), y).backward()
    torch.testing.assert_close(soup.merge_weight.grad, raw.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(soup.beta.grad, beta.grad)


def test_fit_learned_soup_lowers_the_loss():
    nets = _nets()
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(3)]
    soup = LearnedSoup(nets)

    def loss():
        with torch.no_grad():
            return sum(float(torch.nn.functional.cross_entropy(soup(x), y)) for x, y in batches)

    before = loss()
    fit_learned_soup(soup, batches, epochs=3, show_progress=False)
    assert loss() < before
