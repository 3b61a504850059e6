"""Model soups (Wortsman et al. 2022): the greedy soup and the learned soup.

Greedy soup (mlfoundations/model-soups main.py): sort the ingredients by held-out score, descending (equal
scores keep the ingredients' given order: a stable sort); the soup starts as the best one; for each next
ingredient the candidate is soup·n/(n+1) + ingredient/(n+1) (n ingredients in the soup), one fused
linear combination written into a candidate buffer; it is kept only when its score is strictly higher than
the soup's (a tie is rejected). Memory: the soup and the candidate, plus the ingredient being added (with
loaders, only that one is loaded); accepting swaps the two buffers, so a rejected candidate never touches
the soup (an in-place update could not be undone exactly).

Learned soup (learned_bylayer.py): θ_l = Σᵢ αᵢ,l·θᵢ,l, α = softmax over the ingredients of raw weights per
model or per parameter tensor, logits scaled by a learned β; trained with AdamW (lr 0.05, no weight decay)
on held-out cross-entropy, on the fused differentiable merge (fusedmerge/learned.py).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import dispatch, options
from ._forms import gather, prepare
from .learned import MergedModel, progress
from .reference import CombineJob


@dataclass
class GreedySoup:
    """The soup (in the ingredients' form), the indices of the ingredients it took in the order they were
    added, its held-out score, and every ingredient's score."""

    soup: object
    taken: List[int]
    score: float
    scores: List[float]


def _load(ingredient):
    """An ingredient, or a zero-argument loader of one (called when needed)."""
    return ingredient() if callable(ingredient) and not isinstance(ingredient, nn.Module) else ingredient


def _score(evaluate, model, what: str) -> float:
    s = evaluate(model)
    try:
        s = float(s)
    except (TypeError, ValueError):
        raise TypeError(f"evaluate must return a number, got {type(s).__name__} for {what}") from None
    if s != s:
        raise ValueError(f"evaluate returned NaN for {what}; scores must be comparable")
    return s


def greedy_soup(ingredients: Sequence, evaluate: Callable[[object], float], scores: Optional[Sequence[float]] = None,
                *, backend: str = "auto", show_progress: bool = True) -> GreedySoup:
    """The greedy soup of `ingredients` (modules or state dicts, or zero-argument loaders of them):
    `evaluate(model) -> float` is the held-out score (higher is better), called with a model in the
    ingredients' form; `scores` are the ingredients' own, when already known. See the module docstring."""
    items = list(ingredients)
    if not items:
        raise ValueError("ingredients is empty: give at least one model")
    if scores is None:
        scores = [_score(evaluate, _load(x), f"ingredient {i}") for i, x in enumerate(items)]
    else:
        scores = [options.real(s, f"scores[{i}]") for i, s in enumerate(scores)]
        if len(scores) != len(items):
            raise ValueError(f"scores has {len(scores)} entries for {len(items)} ingredients")
    order = sorted(range(len(items)), key=lambda i: scores[i], reverse=True)  # stable: ties keep given order
    first = gather([_load(items[order[0]])], "ingredients")
    soup = _copy(first)
    candidate = _copy(first)
    taken, best = [order[0]], scores[order[0]]
    for i in progress(order[1:], "greedy soup", show_progress):
        forms = gather([_as_form(soup, first), _load(items[i])], "ingredients")
        n = len(taken)
        _, slots = prepare(forms, None, None, gather([_as_form(candidate, first)]).dicts[0])
        jobs = [CombineJob(s.out, s.inputs, [n / (n + 1), 1 / (n + 1)]) for s in slots]
        for device in {j.out.device for j in jobs}:
            dispatch.run("combine", [j for j in jobs if j.out.device == device], backend)
        score = _score(evaluate, _as_form(candidate, first), f"the soup with ingredient {i}")
        if score > best:
            soup, candidate, best = candidate, soup, score
            taken.append(i)
    return GreedySoup(_as_form(soup, first), taken, best, list(scores))


def _copy(forms) -> object:
    """A private copy of the (single) model of `forms`, in its form."""
    if forms.kind == "module":
        return copy.deepcopy(forms.first)
    return {k: v.clone() for k, v in forms.dicts[0].items()}


def _as_form(model, forms):
    return model if forms.kind == "module" else dict(model)


class LearnedSoup(MergedModel):
    """The learned soup of `ingredients` (modules of one architecture): ``β·f(x; Σᵢ αᵢ·θᵢ)`` with α = softmax
    over the ingredients of `merge_weight` ([N] per model, or [N, L] per parameter tensor with
    `per_layer`), β learned (init 1). Starts as the uniform soup. Merges on every forward. The ingredients
    are registered (`.to()` moves them) and frozen (requires_grad False), as FusionBench freezes its task
    vectors."""

    def __init__(self, ingredients: Sequence[nn.Module], per_layer: bool = True, *, backend: str = "auto"):
        items = list(ingredients)
        if not items or not all(isinstance(m, nn.Module) for m in items):
            raise TypeError("ingredients must be a non-empty sequence of nn.Modules of one architecture")
        vectors = [{k: p for k, p in m.named_parameters()} for m in items]
        shape = (len(items), len(vectors[0])) if per_layer else (len(items),)
        super().__init__(torch.zeros(shape), items[0], vectors, base=False, softmax=True,
                         backend=backend)
        self.beta = nn.Parameter(torch.ones(()))
        self.ingredients = nn.ModuleList(items).requires_grad_(False)

    def vector_dicts(self):
        return [dict(m.named_parameters()) for m in self.ingredients]

    def forward(self, *args, **kwargs):
        self.merge_weights()
        return self.beta * super().forward(*args, **kwargs)


def fit_learned_soup(soup: LearnedSoup, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], epochs: int = 5, *,
                     lr: float = 0.05, show_progress: bool = True) -> LearnedSoup:
    """The paper's training: AdamW (lr 0.05, weight decay 0) on cross-entropy over (input, label) batches of
    held-out data, `epochs` passes. Returns `soup`."""
    optimizer = torch.optim.AdamW([soup.merge_weight, soup.beta], lr=lr, weight_decay=0.0)
    data = list(batches)
    for x, y in progress(list(itertools.chain.from_iterable([data] * epochs)), "learned soup", show_progress):
        loss = F.cross_entropy(soup(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    soup.merge_weights()
    return soup
