"""The digits demo (examples/digits_merging.py), fast and seeded: the papers' qualitative results on real
data, with a margin of one percentage point (the test split has 540 images, one image is 0.19 points):
the greedy soup is at least the best ingredient; AdaMerging is at least task arithmetic (λ = 0.3, its
initial value) on the mean accuracy over tasks. Needs scikit-learn (its digits ship with it)."""

import os
import sys

import pytest

pytest.importorskip("sklearn", reason="scikit-learn is not installed (the digits data ship with it)")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import digits_merging  # noqa: E402

MARGIN = 0.01


def test_soups_and_adamerging_on_digits():
    r = digits_merging.run(seed=0, fast=True, show_progress=False)
    soups, multi = r["soups"], r["multitask"]
    assert soups["greedy soup"] >= soups["best ingredient"] - MARGIN
    assert soups["best ingredient"] > soups["pretrained"]
    assert multi["AdaMerging layer-wise"] >= multi["task arithmetic (λ=0.3)"] - MARGIN
    assert multi["AdaMerging task-wise"] >= multi["task arithmetic (λ=0.3)"] - MARGIN
    assert multi["individual (own body per task)"] > multi["task arithmetic (λ=0.3)"]
