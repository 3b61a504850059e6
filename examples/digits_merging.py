"""Model soups and AdaMerging on real data: scikit-learn's handwritten digits (8×8 images, shipped with
scikit-learn, no download), a small MLP, everything seeded.

Soups (one task, all ten digits): pretrain, fine-tune K ingredients with varied hyperparameters, then
compare on the test split the best ingredient (by validation accuracy), the uniform soup, the greedy soup
and the learned soup (both use the validation split). Multi-task (three digit subsets, each fine-tuned with
its own head from the pretrained body): task arithmetic and TIES (λ chosen on labelled validation data),
AdaMerging task-wise and layer-wise (entropy on unlabelled test inputs, as in the paper), on the test split.

    python examples/digits_merging.py [--seed 0] [--out bench/results/digits-merging]
writes OUT.md (the tables) and OUT.png (matplotlib, if installed). ``run(seed, fast=True)`` is the test's.
"""

from __future__ import annotations

import argparse
import copy
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

import fusedmerge
from fusedmerge.learned import progress

TASKS = ((0, 1, 2), (3, 4, 5), (6, 7, 8, 9))
HIDDEN = 64
ADA_STEPS, ADA_LR = 50, 3e-3
LAMBDAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


def load(seed: int):
    """(train, val, test) splits of (x in [0, 1], label), 50/20/30 %, shuffled by `seed`."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    a, b = int(0.5 * len(y)), int(0.7 * len(y))
    return (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])


def body() -> nn.Module:
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU())


def train(model: nn.Module, x, y, *, steps: int, lr: float, seed: int, wd: float = 0.0, smoothing: float = 0.0,
          batch: int = 64, noise: float = 0.0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        xb = x[idx] + noise * torch.randn(x[idx].shape, generator=g)
        loss = F.cross_entropy(model(xb), y[idx], label_smoothing=smoothing)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def subset(split, task):
    x, y = split
    keep = torch.isin(y, torch.tensor(task))
    remap = torch.full((10,), -1, dtype=torch.int64)
    remap[list(task)] = torch.arange(len(task))
    return x[keep], remap[y[keep]]


def soups(data, seed: int, fast: bool, show: bool) -> Dict[str, float]:
    (xtr, ytr), (xva, yva), (xte, yte) = data
    torch.manual_seed(seed)
    pre = train(nn.Sequential(body(), nn.Linear(HIDDEN, 10)), xtr[:300], ytr[:300], steps=100, lr=3e-3, seed=seed)
    grid = [dict(lr=lr, wd=wd, smoothing=s, noise=n) for lr in ((3e-3,) if fast else (1e-3, 3e-3)) for wd, s, n in
            ((0.0, 0.0, 0.0), (0.1, 0.1, 0.1), (0.0, 0.2, 0.2), (0.3, 0.0, 0.3))]
    steps = 80 if fast else 150
    ingredients = [train(copy.deepcopy(pre), xtr, ytr, steps=steps, seed=seed * 100 + i, **h)
                   for i, h in enumerate(progress(grid, "fine-tuning ingredients", show))]
    val = [accuracy(m, xva, yva) for m in ingredients]
    best = max(range(len(val)), key=lambda i: val[i])
    greedy = fusedmerge.greedy_soup(ingredients, lambda m: accuracy(m, xva, yva), val, show_progress=show)
    learned = fusedmerge.LearnedSoup(ingredients)
    fusedmerge.fit_learned_soup(learned, [(xva[i:i + 64], yva[i:i + 64]) for i in range(0, len(yva), 64)],
                                epochs=5, show_progress=show)
    return {"pretrained": accuracy(pre, xte, yte),
            "best ingredient": accuracy(ingredients[best], xte, yte),
            "uniform soup": accuracy(fusedmerge.average(ingredients), xte, yte),
            "greedy soup": accuracy(greedy.soup, xte, yte),
            "learned soup": accuracy(learned, xte, yte),
            "greedy soup ingredients": float(len(greedy.taken)), "ingredients": float(len(ingredients))}


def _multitask_accuracy(bodies_or_one, heads, splits) -> List[float]:
    return [accuracy(nn.Sequential(b, h), *s) for b, h, s in zip(bodies_or_one, heads, splits)]


def multitask(data, seed: int, fast: bool, show: bool) -> Dict[str, float]:
    train_s, val_s, test_s = ([subset(split, t) for t in TASKS] for split in data)
    torch.manual_seed(seed)
    (xtr, ytr), _, _ = data
    pre = train(nn.Sequential(body(), nn.Linear(HIDDEN, 10)), xtr[:150], ytr[:150], steps=60, lr=3e-3,
                seed=seed + 7)[0]
    bodies, heads = [], []
    for i, (x, y) in enumerate(progress(train_s, "fine-tuning tasks", show)):
        torch.manual_seed(seed * 10 + i)
        model = train(nn.Sequential(copy.deepcopy(pre), nn.Linear(HIDDEN, len(TASKS[i]))), x, y,
                      steps=200 if fast else 500, lr=1e-2, seed=seed * 10 + i)
        bodies.append(model[0])
        heads.append(model[1].requires_grad_(False))
    n = len(TASKS)

    def mean_acc(merged_body, splits):
        return sum(_multitask_accuracy([merged_body] * n, heads, splits)) / n

    def best_lambda(merge):
        return max(LAMBDAS, key=lambda lam: mean_acc(merge(lam), val_s))

    ta = lambda lam: fusedmerge.task_arithmetic(pre, bodies, lam)  # noqa: E731
    ties = lambda lam: fusedmerge.ties(pre, bodies, density=0.2, scaling=lam)  # noqa: E731
    out = {"pretrained body": mean_acc(pre, test_s),
           "individual (own body per task)": sum(_multitask_accuracy(bodies, heads, test_s)) / n,
           "task arithmetic (λ=0.3)": mean_acc(ta(0.3), test_s),
           "task arithmetic (λ tuned on val)": mean_acc(ta(best_lambda(ta)), test_s),
           "TIES (λ tuned on val)": mean_acc(ties(best_lambda(ties)), test_s)}
    steps = ADA_STEPS if fast else 4 * ADA_STEPS
    for kind in ("task-wise", "layer-wise"):
        finetuned = [copy.deepcopy(b) for b in bodies]
        base = copy.deepcopy(pre)
        if kind == "task-wise":
            merged = fusedmerge.FusedTaskWiseMergedModel(torch.full((n,), 0.3), base, finetuned, clamp_weights=False)
        else:
            layers = sum(1 for _ in base.parameters())
            merged = fusedmerge.FusedLayerWiseMergedModel(torch.full((n, layers), 0.3), base, finetuned,
                                                          clamp_weights=False)
        batches = [[x[i:i + 32] for i in range(0, len(x), 32)] for x, _ in test_s]
        fusedmerge.adamerging(merged, list(zip(batches, heads)), steps, lr=ADA_LR, show_progress=show)
        out[f"AdaMerging {kind}"] = mean_acc(merged, test_s)
    return out


def run(seed: int = 0, fast: bool = False, show_progress: bool = True) -> Dict[str, Dict[str, float]]:
    """Both experiments for one seed, on one torch thread (fastest for a model this small; restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = load(seed)
        return {"soups": soups(data, seed, fast, show_progress),
                "multitask": multitask(data, seed, fast, show_progress)}
    finally:
        torch.set_num_threads(threads)


def _table(results, seeds) -> str:
    lines = []
    for part, title in (("soups", "One task (10 digits), test accuracy"),
                        ("multitask", "Three tasks (digits 0-2, 3-5, 6-9), mean test accuracy")):
        names = [k for k in results[0][part] if "ingredients" not in k]
        lines += [f"**{title}**, seeds {', '.join(map(str, seeds))} (mean over seeds)", "",
                  "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
                  "|---|" + "---:|" * (len(seeds) + 1)]
        for k in names:
            vals = [r[part][k] for r in results]
            lines.append(f"| {k} | " + " | ".join(f"{100 * v:.1f}" for v in vals) + f" | {100 * sum(vals) / len(vals):.1f} |")
        lines.append("")
    return "\n".join(lines)


def _plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, part, title in zip(axes, ("soups", "multitask"), ("one task: soups", "three tasks: merging")):
        names = [k for k in results[0][part] if "ingredients" not in k]
        means = [100 * sum(r[part][k] for r in results) / len(results) for k in names]
        ax.barh(names, means, color="tab:blue")
        for s in range(len(results)):
            ax.plot([100 * results[s][part][k] for k in names], names, "k.", ms=4)
        ax.set_xlim(min(means) - 10, 100)
        ax.set_xlabel("test accuracy % (bars: mean, dots: seeds)")
        ax.set_title(f"digits, {title}")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="bench/results/digits-merging")
    args = parser.parse_args()
    results = [run(s) for s in args.seeds]
    table = _table(results, args.seeds)
    with open(args.out + ".md", "w") as f:
        f.write(f"# {args.out}.md: examples/digits_merging.py, torch {torch.__version__}\n\n{table}")
    print(table)
    print("plot:", args.out + ".png" if _plot(results, args.out + ".png") else "matplotlib not installed")


if __name__ == "__main__":
    main()
