"""pytest-benchmark hooks: the machine's description in the JSON. Workloads live in workloads.py."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from workloads import DEVICE  # noqa: E402

from fusedmerge import backends  # noqa: E402
from fusedmerge.perf import cpu_name  # noqa: E402


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["device"] = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else cpu_name()
    machine_info["cores"] = os.cpu_count()
    machine_info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    machine_info["backends"] = {n: s.reason for n, s in backends().items()}
