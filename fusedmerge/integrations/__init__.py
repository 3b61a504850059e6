"""Backends for other tools: ``fusedmerge.integrations.fusion_bench`` (FusionBench algorithms) and
``fusedmerge.integrations.mergekit`` (mergekit merge methods). Each imports its tool; ``import fusedmerge``
imports neither."""
