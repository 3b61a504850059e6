"""OPCM continual merging (arXiv 2501.09522) with a batched SVD-based projection.

    ContinualMerger(base, alpha).add(model)... .merged()   constant memory in the number of models
    project(merged_task_vectors, task_vectors, alpha)       the batched projection alone
    opcm_reference(...)                                     FusionBench's loop, one full SVD per matrix
"""

from .merger import ContinualMerger, continual_merge, linear_weights, looks_linear
from .projection import VARIANTS, factor, project, split_rank
from .reference import opcm_reference, project_reference

__all__ = ["ContinualMerger", "continual_merge", "project", "factor", "split_rank", "opcm_reference",
           "project_reference", "linear_weights", "looks_linear", "VARIANTS"]
