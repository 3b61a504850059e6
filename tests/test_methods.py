"""The method registry: every registered method on every backend here, over its own option grid, equal to
its reference bit for bit; the declarations that the CLI, the plugins and the custom ops are generated from
are consistent; each option error names its argument."""

import ast
import dataclasses
import inspect
import pathlib

import pytest
import torch

import fusedmerge
from conftest import CPU_BACKENDS, assert_dicts_equal
from fusedmerge import dispatch
from fusedmerge.methods import CONFIG_METHODS, FUSIONBENCH_ALGORITHMS, METHODS
from fusedmerge.options import op_parameters

SHAPES = {"enc.0.fc.weight": (24, 9), "enc.0.fc.bias": (24,), "enc.1.proj.weight": (9, 24), "norm.weight": (9,),
          "pos": (1, 5, 3), "odd": (131,)}


def _models(dtype, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}
    models = [{k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
              for _ in range(n)]
    return base, models


CASES = [pytest.param(name, i, id=f"{name}-{i}") for name, m in METHODS.items() for i in range(len(m.grid))]


# Every backend in fp32; bf16 on the C++ backend (the Triton interpreter is slow, and the per-method tests run
# Triton in every dtype).
RUNS = [pytest.param(torch.float32, b.values[0], id=f"float32-{b.id}", marks=b.marks) for b in CPU_BACKENDS]
RUNS += [pytest.param(torch.bfloat16, b.values[0], id=f"bfloat16-{b.id}", marks=b.marks)
         for b in CPU_BACKENDS if b.id == "cpu"]


@pytest.mark.parametrize("dtype, backend", RUNS)
@pytest.mark.parametrize("name, case", CASES)
def test_every_method_on_every_backend_equals_its_reference(name, case, dtype, backend, monkeypatch):
    method = METHODS[name]
    options = dict(method.grid[case])
    base, models = _models(dtype, n=method.n_inputs or 3)
    imported = []
    real = dispatch._import
    monkeypatch.setattr(dispatch, "_import", lambda n: imported.append(n) or real(n))
    want = method.call(base, models, **options, backend="torch")
    assert imported == [], "backend='torch' must run the references alone"
    got = method.call(base, models, **options, backend=backend)
    assert set(imported) == ({backend} if method.primitives else set()), f"{name} ran on {set(imported)}, not {backend}"
    assert_dicts_equal(got, want)


def test_every_method_declares_what_the_generated_parts_need():
    for name, m in METHODS.items():
        assert m.function.__doc__ and m.options.__doc__ is not None, name
        assert dataclasses.is_dataclass(m.options) and m.options.__dataclass_params__.frozen, name
        assert set(m.primitives) <= set(dispatch.PRIMITIVES), name
        assert m.grid, f"{name} has no option grid for the generic backend test"
        fields = {f.name for f in dataclasses.fields(m.options)}
        parameters = inspect.signature(m.function).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
            assert fields <= set(parameters) | {"weights"}, (name, fields - set(parameters))
    for c in CONFIG_METHODS.values():
        assert (c.merge is None) == c.whole_model, c.name
        assert c.peer in (None, "mergekit"), c.name


def test_kernel_registrations_match_the_backend_modules():
    """KERNELS is the one list of which backend has which kernel: each entry is a function of the backend
    module (read from its source, since a backend that is not built cannot be imported), and no backend
    module defines a primitive it is not registered for."""
    root = pathlib.Path(dispatch.__file__).parent
    for backend in ("cpu", "cuda", "triton"):
        tree = ast.parse((root / f"{backend}.py").read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        registered = {p for p, names in dispatch.KERNELS.items() if backend in names}
        assert defined & set(dispatch.PRIMITIVES) == registered, backend
    status = fusedmerge.backends()
    assert status["torch"].primitives == tuple(dispatch.PRIMITIVES)
    assert status["cpu"].primitives == ("combine", "ties", "l1_buckets", "select", "row_rank", "uniforms", "dots")


def test_an_explicit_backend_without_the_primitive_raises_and_auto_hands_over(monkeypatch):
    monkeypatch.setitem(dispatch.KERNELS, "l1_buckets", tuple(n for n in dispatch.KERNELS["l1_buckets"] if n != "cpu"))
    base, models = _models(torch.float32)
    with pytest.raises(RuntimeError, match="backend 'cpu' has no L1-norm kernel"):
        fusedmerge.dare(base, models, 0.5, rescale="l1", backend="cpu")
    monkeypatch.setenv("FUSEDMERGE_BACKEND", "cpu")
    with pytest.raises(RuntimeError, match="backend 'cpu' has no L1-norm kernel"):
        fusedmerge.dare(base, models, 0.5, rescale="l1")
    monkeypatch.delenv("FUSEDMERGE_BACKEND")
    assert_dicts_equal(fusedmerge.dare(base, models, 0.5, rescale="l1"),
                       fusedmerge.dare(base, models, 0.5, rescale="l1", backend="torch"))


def test_custom_ops_have_every_declared_parameter():
    for name, m in METHODS.items():
        params = op_parameters(m.options) + list(m.op_extras)
        if not params:
            assert not hasattr(torch.ops.fusedmerge, name), name
            continue
        schema = getattr(torch.ops.fusedmerge, name).default._schema
        heads = ["base", "inputs"] if m.takes_base else ["inputs"]
        assert [a.name for a in schema.arguments] == heads + [p[0] for p in params], name


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if op_parameters(m.options)])
def test_custom_ops_equal_the_functions_on_the_whole_grid_and_pass_opcheck(name):
    m = METHODS[name]
    base, models = _models(torch.float32, n=m.n_inputs or 3)
    op = getattr(torch.ops.fusedmerge, name)
    for options in m.grid:
        for key in ("enc.0.fc.weight", "odd"):
            xs = [sd[key] for sd in models]
            kwargs = dict(options)
            if "coeffs" in kwargs:
                kwargs["weights"] = kwargs.pop("coeffs")
            if kwargs.get("rescale") == "l1":
                kwargs.update(rescale=True, l1_rescale=True)
            if isinstance(kwargs.get("density"), list):
                kwargs["densities"] = kwargs.pop("density")
            args = (base[key], xs) if m.takes_base else (xs,)
            got = op(*args, **kwargs)
            want = m.call(base[key], xs, **options)
            assert torch.equal(got, want), (name, options, key)
            if key == "odd":
                torch.library.opcheck(op, args, kwargs)


BAD = {"float": "x", "bool": "yes", "int": 1.5, "str": 7, "Optional[float]": "x", "Optional[Tuple[float, ...]]": ["a"],
       "Optional[torch.dtype]": torch.int32, "Union[bool, str]": "l2", "Union[float, Tuple[float, ...]]": "x",
       "Union[bool, FrozenSet[str]]": "abc", "Tuple[str, ...]": 7}


@pytest.mark.parametrize("name", list(METHODS))
def test_each_bad_option_is_refused_with_its_name(name):
    m = METHODS[name]
    required = {f.name: 0.5 for f in dataclasses.fields(m.options) if f.default is dataclasses.MISSING}
    checked = []
    for f in dataclasses.fields(m.options):
        assert f.type in BAD, f"{name}.{f.name}: add a bad value for {f.type} here"
        bad = BAD[f.type]
        checked.append(f.name)
        with pytest.raises((TypeError, ValueError), match=f.name):
            m.options(**{**required, f.name: bad})
    assert checked, f"{name}: no option was checked"


def test_fusionbench_classes_and_mergekit_methods_come_from_the_registry():
    pytest.importorskip("fusion_bench")
    from fusedmerge.integrations import fusion_bench

    for cls_name, spec in FUSIONBENCH_ALGORITHMS.items():
        cls = getattr(fusion_bench, cls_name)
        assert list(inspect.signature(cls).parameters)[:len(spec.args)] == [a for a, _ in spec.args]
    pytest.importorskip("mergekit")
    from fusedmerge.integrations import mergekit

    try:
        names = mergekit.install(replace=False, prefix="registry_")
        assert names == [f"registry_{c.name}" for c in CONFIG_METHODS.values() if c.peer == "mergekit"]
    finally:
        mergekit.uninstall()


def test_merge_help_lists_every_configuration_method(capsys):
    from fusedmerge.cli import main

    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    out = capsys.readouterr().out
    for c in CONFIG_METHODS.values():
        assert c.name in out
        for key in [*c.model_params, *c.global_params]:
            assert key in out, (c.name, key)


def test_custom_ops_keep_agreed_integer_tensors_whatever_out_dtype():
    ints = [torch.arange(6).reshape(2, 3)] * 3
    for op, args in ((torch.ops.fusedmerge.average, (ints, None, torch.float32)),
                     (torch.ops.fusedmerge.task_arithmetic, (ints[0], ints[1:], 0.5, None, torch.bfloat16))):
        assert torch.equal(op(*args), ints[0])
        torch.library.opcheck(op, args)
