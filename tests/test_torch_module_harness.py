"""torch's own module harness on HybridBatchNorm1d/2d/3d: BatchNorm's ModuleInfo, generic checks.

The module entries are torch's ``ModuleInfo`` for ``nn.BatchNorm1d/2d/3d``
(``torch.testing._internal.common_modules.module_db``) with the HBN class in place of
BatchNorm's: the same constructor and forward inputs (``module_inputs_torch_nn_BatchNorm*d``:
affine or not, running statistics or not, momentum None, ``bias=False``, a zero batch), the
same error inputs, flags and dtypes. The checks are the generic ones of pytorch's
``test/test_modules.py`` that run on CPU, rewritten for pytest (``test_modules.py`` is not part
of the torch wheel), each on every module input, in train and eval mode, in the dtypes torch
runs it in. ``state_dict`` is one more generic check of ours: a round trip through a fresh
module.
"""

from __future__ import annotations

import copy
import io
import itertools
from operator import methodcaller
from unittest.mock import patch

import pytest

torch = pytest.importorskip("torch")
hbn_torch = pytest.importorskip("backends.torch")
hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("expecttest")  # torch's test utilities need it

# torch's test utilities load a Hypothesis profile of their own when imported; keep ours.
_PROFILE = hypothesis.settings.default
from torch._subclasses.meta_utils import assert_metadata_eq  # noqa: E402
from torch.testing._internal import common_modules, common_utils  # noqa: E402

hypothesis.settings.register_profile("hbn-before-torch-testing", _PROFILE)
hypothesis.settings.load_profile("hbn-before-torch-testing")

pytestmark = pytest.mark.torch

HBN_FOR_BATCHNORM = {
    torch.nn.BatchNorm1d: hbn_torch.HybridBatchNorm1d,
    torch.nn.BatchNorm2d: hbn_torch.HybridBatchNorm2d,
    torch.nn.BatchNorm3d: hbn_torch.HybridBatchNorm3d,
}
BATCHNORM_INFOS = {
    info.module_cls: info
    for info in common_modules.module_db
    if info.module_cls in HBN_FOR_BATCHNORM
}
# test_modules.py's checks, each with the dtypes and modes torch runs it in.
ALL_DTYPES = (torch.float32, torch.float64)
CHECKS = {
    "forward": (ALL_DTYPES, (True, False)),
    "factory_kwargs": (ALL_DTYPES, (True, False)),
    "repr": (ALL_DTYPES, (True, False)),
    "pickle": (ALL_DTYPES, (True, False)),
    "state_dict": (ALL_DTYPES, (True, False)),
    "non_contiguous_tensors": (ALL_DTYPES, (True, False)),
    "grad": ((torch.float64,), (True, False)),
    "gradgrad": ((torch.float64,), (True, False)),
    "memory_format": (ALL_DTYPES, (True, False)),
    "if_train_and_eval_modes_differ": (ALL_DTYPES, (True,)),
    "device_ctx_init": (ALL_DTYPES, (True, False)),
    "errors": (ALL_DTYPES, (True, False)),
    "to": ((torch.float32,), (True, False)),
    "to_empty": ((torch.float32,), (True, False)),
}
NOT_APPLICABLE = {
    "multiple_device_transfer": "needs a CUDA device; this harness runs on CPU",
    "cpu_gpu_parity": "needs a CUDA device; this harness runs on CPU",
    "check_inplace": "torch runs it for modules with an `inplace` argument; BatchNorm has none",
}


def module_inputs(info, dtype, *, requires_grad: bool, training: bool, device="cpu") -> list:
    return info.module_inputs_func(
        info, device=device, dtype=dtype, requires_grad=requires_grad, training=training
    )


# Harness cases that do not apply to HBN, and why.
EVAL_BACKWARD_WITHOUT_AFFINE = (
    "test_to backpropagates through the output of any module with parameters; with "
    "affine=False HBN's one parameter, alpha, takes no part in eval mode (documented), so the "
    "eval output has no gradient, as BatchNorm's with affine=False, which has no parameter"
)


def not_applicable(check: str, training: bool, module_input) -> str | None:
    affine = module_input.constructor_input.args[3:4] != (False,)
    if check == "to" and not training and not affine:
        return EVAL_BACKWARD_WITHOUT_AFFINE
    return None


def harness_cases() -> list:
    cases = []
    for bn_cls, info in BATCHNORM_INFOS.items():
        inputs = module_inputs(info, torch.float32, **_NO_GRAD)
        for check, (dtypes, modes) in CHECKS.items():
            indices = [None] if check == "errors" else list(range(len(inputs)))
            for dtype, training, index in itertools.product(dtypes, modes, indices):
                mode = "train" if training else "eval"
                name = "error_inputs" if index is None else inputs[index].desc or "default"
                case_id = f"{check}-{HBN_FOR_BATCHNORM[bn_cls].__name__}-{mode}-{dtype}-{name}"
                reason = None if index is None else not_applicable(check, training, inputs[index])
                marks = [] if reason is None else [pytest.mark.skip(reason=reason)]
                cases.append(
                    pytest.param(check, bn_cls, dtype, training, index, id=case_id, marks=marks)
                )
    return cases


_NO_GRAD = {"requires_grad": False, "training": True}


def make_module(hbn_cls, module_input, dtype, training: bool):
    """Built as test_modules.py builds it: constructor inputs, then ``.to(device).to(dtype)``."""
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    m = hbn_cls(*args, **kwargs)
    m.to("cpu").to(dtype)
    m.train(training)
    return m


def forward_input(module_input) -> torch.Tensor:
    (x,) = module_input.forward_input.args
    assert not module_input.forward_input.kwargs
    return x


def assert_parameters_and_buffers_are(m, device, dtype) -> None:
    for name, tensor in itertools.chain(m.named_parameters(), m.named_buffers()):
        assert tensor.device == torch.device(device), name
        if tensor.dtype.is_floating_point:
            assert tensor.dtype == dtype, name


def check_forward(hbn_cls, info, dtype, training, index):
    module_input = module_inputs(info, dtype, requires_grad=False, training=training)[index]
    m = make_module(hbn_cls, module_input, dtype, training)
    x = forward_input(module_input)
    assert m(x).shape == x.shape  # BatchNorm's ModuleInfo has no reference_fn
    methodcaller({torch.float32: "float", torch.float64: "double"}[dtype])(m)
    m(x)
    assert_parameters_and_buffers_are(m, "cpu", dtype)


def check_factory_kwargs(hbn_cls, info, dtype, training, index):
    module_input = module_inputs(info, dtype, requires_grad=False, training=training)[index]
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    parameter_new = common_utils.mock_wrapper(torch.nn.Parameter.__new__)
    register_buffer = common_utils.mock_wrapper(torch.nn.Module.register_buffer)
    with (
        patch.object(torch.nn.Parameter, "__new__", parameter_new),
        patch.object(torch.nn.Module, "register_buffer", register_buffer),
    ):
        hbn_cls(*args, **kwargs).train(training)
    constructor_tensors = common_utils.get_tensors_from(args, kwargs)
    created = [
        common_utils.get_tensors_from(call_args, call_kwargs)
        for mock in (parameter_new.mock, register_buffer.mock)
        for call_args, call_kwargs in mock.call_args_list
    ]
    assert any(tensors and not constructor_tensors & tensors for tensors in created)
    m = hbn_cls(*args, **{**kwargs, "device": "cpu", "dtype": dtype}).train(training)
    assert_parameters_and_buffers_are(m, "cpu", dtype)


def check_repr(hbn_cls, info, dtype, training, index):
    module_input = module_inputs(info, dtype, requires_grad=False, training=training)[index]
    m = make_module(hbn_cls, module_input, dtype, training)
    repr(m), str(m)


def check_pickle(hbn_cls, info, dtype, training, index):
    module_input = module_inputs(info, dtype, requires_grad=False, training=training)[index]
    m = make_module(hbn_cls, module_input, dtype, training)
    x = forward_input(module_input)
    output = m(x)
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    # The bytes were written by this test a line above: nothing untrusted is unpickled.
    m_copy = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(m_copy(x), output, equal_nan=True)


def check_state_dict(hbn_cls, info, dtype, training, index):
    module_input = module_inputs(info, dtype, requires_grad=False, training=training)[index]
    m = make_module(hbn_cls, module_input, dtype, training)
    x = forward_input(module_input)
    m(x)  # in training, the running statistics move
    fresh = make_module(hbn_cls, module_input, dtype, training)
    fresh.load_state_dict(m.state_dict())
    for name, value in m.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(fresh(x), m(x), equal_nan=True)


def make_non_contiguous(t: torch.Tensor) -> torch.Tensor:
    out = torch.repeat_interleave(t, 2, dim=-1)[..., ::2].detach()
    out.requires_grad = t.requires_grad
    return out


def check_non_contiguous_tensors(hbn_cls, info, dtype, training, index):
    module_input = module_inputs(info, dtype, requires_grad=True, training=training)[index]
    m = make_module(hbn_cls, module_input, dtype, training)
    x = forward_input(module_input)
    default_output = m(x)
    grad_output = default_output.clone().detach_().normal_()
    default_output.backward(grad_output, retain_graph=True)
    default_input_grad = copy.deepcopy(x.grad)
    default_param_grads = copy.deepcopy([p.grad for p in m.parameters()])
    inputs = (x, make_non_contiguous(x))
    grads = (grad_output, make_non_contiguous(grad_output))
    for inp, g_out in itertools.product(inputs, grads):
        inp.grad = None
        for p in m.parameters():
            p.grad = None
        out = m(inp)
        out.backward(copy.deepcopy(g_out), retain_graph=True)
        torch.testing.assert_close(out, default_output, equal_nan=True)
        torch.testing.assert_close(inp.grad, default_input_grad, atol=1e-4, rtol=0)
        for actual, expected in zip(
            [p.grad for p in m.parameters()], default_param_grads, strict=True
        ):
            torch.testing.assert_close(actual, expected)


def gradients_helper(hbn_cls, info, dtype, training, index, check):
    """test_modules.py's ``_test_gradients_helper``: the total, then each partial derivative."""
    module_input = module_inputs(info, dtype, requires_grad=True, training=training)[index]
    m = make_module(hbn_cls, module_input, dtype, training)
    params = tuple(m.parameters())
    x = forward_input(module_input)

    def fn_to_gradcheck(x, *params):  # noqa: ARG001 - gradcheck perturbs the parameters in place
        return m(x)

    assert check(fn_to_gradcheck, (x, *params))
    old_requires_grad = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad = False
    for p, old in zip(params, old_requires_grad, strict=True):
        p.requires_grad = old
        assert check(fn_to_gradcheck, (x, *params))
        p.requires_grad = False


def check_grad(hbn_cls, info, dtype, training, index):
    gradients_helper(hbn_cls, info, dtype, training, index, common_utils.gradcheck)


def check_gradgrad(hbn_cls, info, dtype, training, index):
    assert info.supports_gradgrad
    gradients_helper(hbn_cls, info, dtype, training, index, common_utils.gradgradcheck)


def memory_formats(ndim: int) -> tuple[list, list]:
    """The input and the module memory formats test_modules.py tries for an input rank."""
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(ndim)
    extra = [] if channels_last is None else [channels_last]
    return (
        [torch.contiguous_format, *extra],
        [torch.preserve_format, torch.contiguous_format, *extra],
    )


def assert_memory_format(t: torch.Tensor, input_format) -> None:
    if t.dim() in (4, 5) and input_format in (torch.channels_last, torch.channels_last_3d):
        assert t.is_contiguous(memory_format=input_format)
    else:
        assert t.is_contiguous()


def check_memory_format(hbn_cls, info, dtype, training, index):
    module_input = module_inputs(info, dtype, requires_grad=True, training=training)[index]
    assert not info.module_memformat_affects_out
    m = make_module(hbn_cls, module_input, dtype, training)
    x = forward_input(module_input)
    desired = m(x)
    if training:
        params = tuple(m.parameters())
        ref_grad_output = torch.rand_like(desired)
        ref_grads = torch.autograd.grad(desired, (x, *params), ref_grad_output)
    input_formats, module_formats = memory_formats(x.dim())
    for input_format in input_formats:
        x_f = x.clone().to(memory_format=input_format).detach().requires_grad_(x.requires_grad)
        for module_format in module_formats:
            m.to(memory_format=module_format)
            out = m(x_f)
            if input_format != torch.contiguous_format or module_format != torch.contiguous_format:
                torch.testing.assert_close(out, desired, equal_nan=True)
            assert_memory_format(out, input_format)
            if training:
                params = tuple(m.parameters())
                grad_output = torch.empty_like(out).copy_(ref_grad_output)
                grads = torch.autograd.grad(out, (x_f, *params), grad_output)
                torch.testing.assert_close(grads, ref_grads)
                for g in grads:
                    assert_memory_format(g, input_format)


def check_if_train_and_eval_modes_differ(hbn_cls, info, dtype, training, index):
    module_input = module_inputs(info, dtype, requires_grad=False, training=training)[index]
    m = make_module(hbn_cls, module_input, dtype, training)
    delattr(m, "training")
    with pytest.raises(AttributeError, match="'training'"):
        m(forward_input(module_input))
    assert info.train_and_eval_differ


def check_device_ctx_init(hbn_cls, info, dtype, training, index):
    module_input = module_inputs(info, dtype, requires_grad=False, training=training)[index]
    with torch.device("meta"):
        meta_input = module_inputs(
            info, dtype, requires_grad=False, training=training, device=None
        )[index]
    m_cpu = hbn_cls(*module_input.constructor_input.args, **module_input.constructor_input.kwargs)
    with torch.device("meta"):
        m = hbn_cls(*meta_input.constructor_input.args, **meta_input.constructor_input.kwargs)
    pairs = itertools.chain(
        zip(m.parameters(), m_cpu.parameters(), strict=True),
        zip(m.buffers(), m_cpu.buffers(), strict=True),
    )
    for p_meta, p_cpu in pairs:
        assert p_meta.is_meta
        assert_metadata_eq(lambda a, b, **_: _assert_equal(a, b), p_meta, p_cpu)


def _assert_equal(a, b) -> None:
    assert a == b, (a, b)


def check_errors(hbn_cls, info, dtype, training, index):
    assert index is None
    error_inputs = info.module_error_inputs_func(
        info, device="cpu", dtype=dtype, requires_grad=False, training=training
    )
    assert error_inputs
    for error_input in error_inputs:
        module_input = error_input.module_error_input
        args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        if error_input.error_on == common_modules.ModuleErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                hbn_cls(*args, **kwargs)
        else:
            m = hbn_cls(*args, **kwargs)
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                m(forward_input(module_input))


@pytest.fixture
def swap_setting():
    """test_modules.py's ``wrapSwapTensorsTest``: restore torch's global swap setting after."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    yield torch.__future__.set_swap_module_params_on_conversion
    torch.__future__.set_swap_module_params_on_conversion(before)


def check_to(hbn_cls, info, dtype, training, index, *, swap: bool, set_grad: bool):
    module_input = module_inputs(info, dtype, requires_grad=False, training=training)[index]
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    m = hbn_cls(*args, **kwargs)
    x = forward_input(module_input)
    # Not module.to(): the method under test. New parameters and buffers, as test_modules.py.
    for name, p in m.named_parameters(recurse=False):
        new_p = torch.nn.Parameter(p.detach().clone().to("cpu", dtype))
        setattr(m, name, new_p)
        if set_grad:
            new_p.grad = torch.randn_like(new_p)
    for name, b in m.named_buffers(recurse=False):
        setattr(m, name, b.detach().clone().to("cpu", dtype))
    m.train(training)
    if swap and not set_grad:
        m(x).sum().backward()
        m.to(dtype=torch.half)
        m.to(dtype=torch.float32)
    prev_dtype = dtype
    for dtype_ in info.dtypes:
        grad_no_swap = dtype_ == prev_dtype
        prev_dtype = dtype_
        p_ids_before = [id(p) for p in m.parameters()]
        p_cdatas_before = [p._cdata for p in m.parameters()]
        g_ids_before = [id(p.grad) for p in m.parameters()] if set_grad else []
        g_cdatas_before = [p.grad._cdata for p in m.parameters()] if set_grad else []
        m.to(device="cpu", dtype=dtype_)
        assert all(isinstance(p, torch.nn.Parameter) for p in m.parameters())
        assert all(p.device.type == "cpu" and p.dtype == dtype_ for p in m.parameters())
        assert [id(p) for p in m.parameters()] == p_ids_before
        p_cdatas_after = [p._cdata for p in m.parameters()]
        if swap:
            assert all(a != b for a, b in zip(p_cdatas_before, p_cdatas_after, strict=True))
        else:
            assert p_cdatas_after == p_cdatas_before
        if set_grad:
            assert all(p.grad.dtype == dtype_ for p in m.parameters())
            g_cdatas_after = [p.grad._cdata for p in m.parameters()]
            if swap:
                changed = [a != b for a, b in zip(g_cdatas_before, g_cdatas_after, strict=True)]
                assert all(c != grad_no_swap for c in changed)
            else:
                assert g_cdatas_after == g_cdatas_before
                assert [id(p.grad) for p in m.parameters()] == g_ids_before
        with torch.no_grad():  # a graph that holds the parameters would block the next swap
            assert m(x.to(dtype_)).dtype == dtype_


def check_to_empty(hbn_cls, info, dtype, training, index, *, swap: bool):
    with torch.device("meta"):
        module_input = module_inputs(
            info, dtype, requires_grad=False, training=training, device=None
        )[index]
        args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        m = hbn_cls(*args, **kwargs)
    p_ids_before = [id(p) for p in m.parameters()]
    p_cdatas_before = [p._cdata for p in m.parameters()]
    m.to_empty(device="cpu")
    assert all(isinstance(p, torch.nn.Parameter) for p in m.parameters())
    assert all(p.device == torch.device("cpu") and p.dtype == dtype for p in m.parameters())
    p_ids_after = [id(p) for p in m.parameters()]
    p_cdatas_after = [p._cdata for p in m.parameters()]
    assert all(a != b for a, b in zip(p_cdatas_before, p_cdatas_after, strict=True))
    if swap:
        assert p_ids_after == p_ids_before
    else:
        assert all(a != b for a, b in zip(p_ids_before, p_ids_after, strict=True))


CHECK_FUNCTIONS = {
    name: globals()[f"check_{name}"] for name in CHECKS if name not in ("to", "to_empty")
}


@pytest.mark.parametrize(("check", "bn_cls", "dtype", "training", "index"), harness_cases())
def test_torch_module_harness(check, bn_cls, dtype, training, index, swap_setting):
    hbn_cls, info = HBN_FOR_BATCHNORM[bn_cls], BATCHNORM_INFOS[bn_cls]
    if check == "to":
        for swap, set_grad in itertools.product((True, False), (True, False)):
            swap_setting(swap)
            check_to(hbn_cls, info, dtype, training, index, swap=swap, set_grad=set_grad)
    elif check == "to_empty":
        for swap in (True, False):
            swap_setting(swap)
            check_to_empty(hbn_cls, info, dtype, training, index, swap=swap)
    else:
        CHECK_FUNCTIONS[check](hbn_cls, info, dtype, training, index)


@pytest.mark.parametrize("check", sorted(NOT_APPLICABLE))
def test_torch_module_harness_checks_that_do_not_apply(check):
    pytest.skip(NOT_APPLICABLE[check])


def test_the_harness_covers_batchnorms_inputs_and_hbns_classes():
    """Every BatchNorm entry of torch's module_db is here, with inputs that exercise HBN."""
    assert set(BATCHNORM_INFOS) == set(HBN_FOR_BATCHNORM)
    descs = {
        bn_cls.__name__: [i.desc for i in module_inputs(info, torch.float32, **_NO_GRAD)]
        for bn_cls, info in BATCHNORM_INFOS.items()
    }
    for names in descs.values():
        assert "zero_batch" in names
        assert "affine_not_bias" in names
        assert "not_tracking_stats" in names
