"""backends.torch: HybridBatchNorm1d/2d/3d, statistics collection and convert_batchnorm."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests import oracle
from tests.strategies import floats

torch = pytest.importorskip("torch")
hbn_torch = pytest.importorskip("backends.torch")

from hbn_core import Moments, hbn_backward, hbn_forward  # noqa: E402

pytestmark = pytest.mark.torch

LAYERS = {
    (2,): hbn_torch.HybridBatchNorm1d,
    (3,): hbn_torch.HybridBatchNorm1d,
    (4,): hbn_torch.HybridBatchNorm2d,
    (5,): hbn_torch.HybridBatchNorm3d,
}
PATHS = pytest.mark.parametrize("path", ["compiled-kernel", "fused-kernels", "array-api-core"])


def use_path(layer: object, path: str) -> None:
    """Make ``layer`` train on ``path``; the C++ operator must have been built for its path."""
    layer.use_compiled_kernel = path == "compiled-kernel"
    layer.use_fused_kernels = path != "array-api-core"
    if path == "compiled-kernel":
        assert hbn_torch.compiled_kernel_available()


@st.composite
def layer_cases(draw: st.DrawFn) -> dict:
    """A layer's float64 parameters and statistics, and an input of rank 2 to 5."""
    ndim = draw(st.integers(2, 5))
    channels = draw(st.integers(1, 4))
    shape = (draw(st.integers(1, 5)), channels, *(draw(st.integers(1, 3)) for _ in range(ndim - 2)))

    def vector(low: float, high: float) -> np.ndarray:
        return draw(hnp.arrays(np.float64, (channels,), elements=floats(low, high)))

    return {
        "x": draw(hnp.arrays(np.float64, shape, elements=floats(-20, 20))),
        "weight": vector(-2, 2),
        "bias": vector(-2, 2),
        "alpha": vector(-4, 4),
        "global_mean": vector(-3, 3),
        "global_var": vector(0.1, 5),
        "dy": draw(hnp.arrays(np.float64, shape, elements=floats(-1, 1))),
    }


def make_layer(case: dict, *, path: str) -> object:
    layer = LAYERS[(case["x"].ndim,)](case["x"].shape[1], dtype=torch.float64)
    use_path(layer, path)
    with torch.no_grad():
        for name in ("weight", "bias", "alpha", "global_mean", "global_var"):
            getattr(layer, name).copy_(torch.from_numpy(case[name]))
    return layer


def oracle_args(case: dict) -> tuple:
    return tuple(case[k] for k in ("x", "weight", "bias", "alpha", "global_mean", "global_var"))


@PATHS
@given(case=layer_cases())
def test_training_forward_equals_float64_oracle(case, path):
    layer = make_layer(case, path=path)
    y = layer(torch.from_numpy(case["x"]))
    expected = oracle.hbn_forward(*oracle_args(case), channel_axis=1, eps=1e-5)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-10, atol=1e-10)


@PATHS
@given(case=layer_cases())
def test_gradients_equal_the_core_backward(case, path):
    layer = make_layer(case, path=path)
    x = torch.from_numpy(case["x"]).requires_grad_(True)
    y = layer(x)
    grads = torch.autograd.grad(
        y, (x, layer.weight, layer.bias, layer.alpha), torch.from_numpy(case["dy"])
    )
    _, residuals = hbn_forward(*oracle_args(case))
    expected = hbn_backward(case["dy"], residuals)
    for actual, reference in zip(grads, expected, strict=True):
        scale = 1 + np.abs(reference).max()
        np.testing.assert_allclose(actual.numpy(), reference, rtol=1e-9, atol=1e-9 * scale)


@pytest.mark.parametrize("threads", [1, 4])
def test_the_operators_threaded_loop_gives_the_core_backward(threads):
    """An (N, C) input's gradient is one loop split over torch's threads by rows.

    The test sessions give each worker process one thread (conftest.py), which would leave the
    split untested: here 40,000 rows of 3 channels make four tasks of 10,922 rows (torch's grain
    of 32,768 elements) on 4 threads, and one on 1. A loop that wrote only its first task's rows
    passes on 1 thread and fails on 4, provided the operator is built with OpenMP.
    """
    rng = np.random.default_rng(threads)
    channels = 3
    case = {
        "x": rng.normal(2.0, 3.0, (40_000, channels)),
        "weight": rng.normal(size=channels),
        "bias": rng.normal(size=channels),
        "alpha": rng.normal(size=channels),
        "global_mean": rng.normal(size=channels),
        "global_var": rng.uniform(0.5, 2.0, channels),
        "dy": rng.normal(size=(40_000, channels)),
    }
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        layer = make_layer(case, path="compiled-kernel")
        x = torch.from_numpy(case["x"]).requires_grad_(True)
        (dx,) = torch.autograd.grad(layer(x), (x,), torch.from_numpy(case["dy"]))
    finally:
        torch.set_num_threads(previous)
    _, residuals = hbn_forward(*oracle_args(case))
    expected = hbn_backward(case["dy"], residuals)[0]
    np.testing.assert_allclose(dx.numpy(), expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())


@PATHS
@pytest.mark.parametrize("shape", [(5, 3), (4, 2, 3), (3, 2, 2, 3), (2, 2, 2, 2, 2)])
def test_gradcheck_in_float64(shape, path):
    rng = np.random.default_rng(sum(shape))
    case = {
        "x": rng.standard_normal(shape),
        "weight": rng.standard_normal(shape[1]),
        "bias": rng.standard_normal(shape[1]),
        "alpha": rng.standard_normal(shape[1]),
        "global_mean": rng.standard_normal(shape[1]),
        "global_var": rng.uniform(0.5, 2, shape[1]),
    }
    layer = make_layer(case, path=path)

    def call(x, weight, bias, alpha):
        parameters = {"weight": weight, "bias": bias, "alpha": alpha}
        return torch.func.functional_call(layer, parameters, (x,))

    inputs = [
        torch.from_numpy(case[k]).requires_grad_(True) for k in ("x", "weight", "bias", "alpha")
    ]
    assert torch.autograd.gradcheck(call, inputs)


@given(case=layer_cases())
def test_eval_uses_the_global_statistics_only(case):
    layer = make_layer(case, path="compiled-kernel").eval()
    y = layer(torch.from_numpy(case["x"]))
    expected = oracle.inference(
        *oracle_args(case)[:3], *oracle_args(case)[4:], channel_axis=1, eps=1e-5
    )
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-10, atol=1e-10)


@PATHS
def test_affine_false_keeps_a_learnable_alpha(path):
    layer = hbn_torch.HybridBatchNorm2d(3, affine=False)
    use_path(layer, path)
    assert layer.weight is None
    assert layer.bias is None
    assert [name for name, _ in layer.named_parameters()] == ["alpha"]
    x = torch.randn(4, 3, 2, 2, dtype=torch.float32)
    layer(x).square().sum().backward()
    assert layer.alpha.grad is not None
    assert torch.isfinite(layer.alpha.grad).all()
    ones, zeros = np.ones(3), np.zeros(3)
    expected = oracle.hbn_forward(
        x.double().numpy(), ones, zeros, zeros, zeros, ones, channel_axis=1, eps=1e-5
    )
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=1e-5, atol=1e-5)


@PATHS
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_running_statistics_follow_torch_batchnorm(momentum, path):
    torch.manual_seed(0)
    hbn = hbn_torch.HybridBatchNorm2d(3, momentum=momentum, dtype=torch.float64)
    use_path(hbn, path)
    bn = torch.nn.BatchNorm2d(3, momentum=momentum, dtype=torch.float64)
    for _ in range(3):
        x = 2 + 3 * torch.randn(6, 3, 4, 4, dtype=torch.float64)
        hbn(x), bn(x)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(hbn, name), getattr(bn, name), rtol=1e-12, atol=1e-12)


def test_parameters_and_buffers_have_torch_names():
    layer = hbn_torch.HybridBatchNorm2d(3)
    assert list(layer.state_dict()) == [
        "weight",
        "bias",
        "alpha",
        "global_mean",
        "global_var",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    ]
    torch.testing.assert_close(layer.alpha, torch.zeros(3))
    torch.testing.assert_close(layer.global_mean, torch.zeros(3))
    torch.testing.assert_close(layer.global_var, torch.ones(3))
    no_running = hbn_torch.HybridBatchNorm1d(3, track_running_stats=False)
    assert list(no_running.state_dict()) == ["weight", "bias", "alpha", "global_mean", "global_var"]


def small_cnn(norm: type) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        norm(4),
        torch.nn.ReLU(),
        torch.nn.Sequential(
            torch.nn.Conv2d(4, 6, 3, stride=2, padding=1), norm(6), torch.nn.ReLU()
        ),
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 4 * 4, 10),
    )


def test_state_dict_round_trips_through_a_fresh_model():
    torch.manual_seed(0)
    model = small_cnn(hbn_torch.HybridBatchNorm2d)
    with torch.no_grad():
        for _, layer in hbn_torch.hbn_layers(model):
            layer.alpha.normal_(), layer.global_mean.normal_(), layer.global_var.uniform_(0.5, 2)
    model(torch.randn(8, 1, 8, 8))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = small_cnn(hbn_torch.HybridBatchNorm2d)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(5, 1, 8, 8)
    for mode in (True, False):
        model.train(mode), fresh.train(mode)
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def recorded_inputs(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """Each HBN layer's inputs over ``batches``, recorded by forward pre-hooks (the oracle)."""
    seen: dict[str, list[np.ndarray]] = {name: [] for name, _ in hbn_torch.hbn_layers(model)}
    hooks = [
        layer.register_forward_pre_hook(
            lambda _, args, name=name: seen[name].append(args[0].double().numpy())
        )
        for name, layer in hbn_torch.hbn_layers(model)
    ]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for hook in hooks:
        hook.remove()
    return {name: np.concatenate(arrays) for name, arrays in seen.items()}


@pytest.mark.parametrize("mode", ["hybrid", "global"])
def test_collection_equals_moments_of_concatenated_inputs_and_changes_nothing(mode):
    torch.manual_seed(1)
    model = small_cnn(hbn_torch.HybridBatchNorm2d)
    with torch.no_grad():
        for _, layer in hbn_torch.hbn_layers(model):
            layer.alpha.normal_(), layer.global_mean.normal_(), layer.global_var.uniform_(0.5, 2)
    batches = [torch.randn(n, 1, 8, 8) for n in (5, 1, 7)]
    before = copy.deepcopy(model.state_dict())

    with torch.no_grad(), hbn_torch.collect_statistics(model, mode=mode) as stats:
        outputs = [model(batch) for batch in batches]

    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    reference_mode = model.train() if mode == "hybrid" else model.eval()
    with torch.no_grad():
        torch.testing.assert_close(outputs[0], reference_mode(batches[0]))
    model.load_state_dict(before)  # the train-mode reference call updated running statistics
    inputs = recorded_inputs(model.train() if mode == "hybrid" else model.eval(), batches)
    assert set(stats) == set(inputs) == {"1", "3.1"}
    for name, data in inputs.items():
        axes = (0, 2, 3)
        assert int(stats[name].count) == data.size // data.shape[1]
        assert stats[name].mean.dtype == torch.float64
        np.testing.assert_allclose(
            stats[name].mean.numpy(), data.mean(axis=axes), rtol=1e-5, atol=1e-6
        )
        m2 = ((data - data.mean(axis=axes, keepdims=True)) ** 2).sum(axis=axes)
        np.testing.assert_allclose(stats[name].m2.numpy(), m2, rtol=1e-5, atol=1e-5)


def test_set_global_statistics_writes_mean_and_biased_variance():
    model = small_cnn(hbn_torch.HybridBatchNorm2d)
    with torch.no_grad(), hbn_torch.collect_statistics(model) as stats:
        model(torch.randn(6, 1, 8, 8))
    hbn_torch.set_global_statistics(model, stats)
    layer = dict(hbn_torch.hbn_layers(model))["3.1"]
    m = stats["3.1"]
    torch.testing.assert_close(layer.global_mean, m.mean.float())
    torch.testing.assert_close(layer.global_var, (m.m2 / m.count).float())


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda s: s.pop("1"), r"missing \['1'\], unknown \[\]"),
        (lambda s: s.update(extra=s["1"]), r"missing \[\], unknown \['extra'\]"),
        (
            lambda s: s.update({"3.1": s["3.1"]._replace(count=torch.tensor(0))}),
            r"`statistics\['3.1'\]` must have a positive count; got 0",
        ),
        (
            lambda s: s.update({"1": s["3.1"]}),
            r"`statistics\['1'\]` must have a 0-d count and \(4,\) mean",
        ),
        (
            lambda s: s.update({"3.1": s["3.1"]._replace(mean=s["3.1"].mean * np.nan)}),
            r"must hold finite means",
        ),
    ],
)
def test_bad_statistics_are_rejected_and_change_nothing(edit, pattern):
    model = small_cnn(hbn_torch.HybridBatchNorm2d)
    with torch.no_grad(), hbn_torch.collect_statistics(model) as stats:
        model(torch.randn(6, 1, 8, 8))
    stats = dict(stats)
    edit(stats)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=pattern):
        hbn_torch.set_global_statistics(model, stats)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_global_statistics_accept_numpy_moments():
    model = torch.nn.Sequential(hbn_torch.HybridBatchNorm1d(2))
    moments = Moments(np.asarray(4), np.array([1.0, -1.0]), np.array([8.0, 4.0]))
    hbn_torch.set_global_statistics(model, {"0": moments})
    torch.testing.assert_close(model[0].global_var, torch.tensor([2.0, 1.0]))


def test_hbn_layers_are_found_by_type_not_name():
    model = torch.nn.ModuleDict(
        {
            "bn": torch.nn.BatchNorm2d(2),
            "block": torch.nn.Sequential(hbn_torch.HybridBatchNorm2d(2)),
        }
    )
    assert [name for name, _ in hbn_torch.hbn_layers(model)] == ["block.0"]


def trained_batchnorm_model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(2)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Sequential(
            torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4, affine=False)
        ),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 8 * 8, 16),
        torch.nn.BatchNorm1d(16),
        torch.nn.Linear(16, 3),
    ).to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 1, 8, 8, dtype=dtype)).square().mean().backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_convert_batchnorm_preserves_eval_outputs(dtype):
    model = trained_batchnorm_model(dtype)
    x = torch.randn(5, 1, 8, 8, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
        converted = hbn_torch.convert_batchnorm(copy.deepcopy(model))
        actual = converted(x)
    assert [type(layer).__name__ for _, layer in hbn_torch.hbn_layers(converted)] == [
        "HybridBatchNorm2d",
        "HybridBatchNorm2d",
        "HybridBatchNorm1d",
    ]
    assert not any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in converted.modules()
    )
    assert all(p.dtype == dtype for p in converted.parameters())
    assert converted[3][1].weight is None
    torch.testing.assert_close(
        actual, expected, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=1e-6
    )


def test_convert_batchnorm_turns_syncbatchnorm_into_the_rank_agnostic_layer():
    converted = hbn_torch.convert_batchnorm(torch.nn.SyncBatchNorm(3))
    assert type(converted) is hbn_torch.HybridBatchNorm
    assert converted(torch.randn(2, 3, 2, 2, 2)).shape == (2, 3, 2, 2, 2)


@pytest.mark.parametrize(
    ("layer", "shape", "pattern"),
    [
        (hbn_torch.HybridBatchNorm2d(3), (4, 3, 5), r"expected 4D input \(got 3D input\)"),
        (hbn_torch.HybridBatchNorm1d(3), (4, 3, 5, 5), r"expected 2D or 3D input \(got 4D input\)"),
        (hbn_torch.HybridBatchNorm3d(3), (4, 3), r"expected 5D input \(got 2D input\)"),
        (
            hbn_torch.HybridBatchNorm2d(3),
            (4, 2, 5, 5),
            r"HybridBatchNorm2d\(3\) expected an input of shape \(N, 3, \.\.\.\)"
            r".*got shape \(4, 2, 5, 5\)",
        ),
    ],
)
def test_wrong_rank_or_channels_raise_like_torch(layer, shape, pattern):
    for mode in (True, False):
        with pytest.raises(ValueError, match=pattern):
            layer.train(mode)(torch.randn(shape))


def test_collection_needs_a_known_mode_and_hbn_layers():
    model = small_cnn(hbn_torch.HybridBatchNorm2d)
    with pytest.raises(ValueError, match=r"`mode` must be 'hybrid' or 'global'; got 'batch'"):
        hbn_torch.collect_statistics(model, mode="batch").__enter__()
    with pytest.raises(ValueError, match=r"`model` has no HBN layer"):
        hbn_torch.collect_statistics(torch.nn.Linear(2, 2)).__enter__()
    with (
        hbn_torch.collect_statistics(model),
        pytest.raises(RuntimeError, match=r"statistics are already being collected on"),
    ):
        hbn_torch.collect_statistics(model).__enter__()
    assert all(layer._collector is None for _, layer in hbn_torch.hbn_layers(model))


@PATHS
# torch.compile's own internals (dynamo, inductor) emit DeprecationWarnings about torch APIs.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torch_compile_fullgraph_matches_eager(path):
    torch.manual_seed(3)
    model = small_cnn(hbn_torch.HybridBatchNorm2d).double()
    for _, layer in hbn_torch.hbn_layers(model):
        use_path(layer, path)
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    for mode in (True, False):
        model.train(mode), compiled.train(mode)
        eager_out, compiled_out = model(x), compiled(x)
        torch.testing.assert_close(compiled_out, eager_out, rtol=1e-10, atol=1e-10)
        # alpha takes no part in eval mode: its gradient is None in both.
        eager_grads = torch.autograd.grad(
            eager_out.square().sum(), list(model.parameters()), allow_unused=True
        )
        compiled_grads = torch.autograd.grad(
            compiled_out.square().sum(), list(compiled.parameters()), allow_unused=True
        )
        for a, b in zip(compiled_grads, eager_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("norm", ["hbn", "bn"])
def test_sgd_trains_a_cnn_with_hbn_as_with_batchnorm(norm):
    torch.manual_seed(4)
    x = torch.randn(64, 1, 8, 8)
    labels = (x[:, 0, :4].mean(dim=(1, 2)) > x[:, 0, 4:].mean(dim=(1, 2))).long()
    model = small_cnn(hbn_torch.HybridBatchNorm2d if norm == "hbn" else torch.nn.BatchNorm2d)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(60):
        for batch in range(0, 64, 16):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(
                model(x[batch : batch + 16]), labels[batch : batch + 16]
            )
            loss.backward()
            optimizer.step()
        losses.append(loss.detach().item())
    assert np.mean(losses[-5:]) < 0.25 * np.mean(losses[:5]), losses[::10]


@PATHS
def test_torch_func_grad_equals_autograd(path):
    """The setup_context-style Function composes with torch.func transforms.

    As for torch's BatchNorm, torch.func needs layers that do not update running statistics in
    place (``track_running_stats=False``; functorch's ``replace_all_batch_norm_modules_``).
    """
    torch.manual_seed(5)
    layer = hbn_torch.HybridBatchNorm2d(3, track_running_stats=False, dtype=torch.float64)
    use_path(layer, path)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    params = {name: p.detach() for name, p in layer.named_parameters()}

    def loss(params: dict, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, params, (x,)).pow(3).sum()

    functional = torch.func.grad(loss, argnums=(0, 1))(params, x)
    leaves = {name: p.clone().requires_grad_(True) for name, p in params.items()}
    x_leaf = x.clone().requires_grad_(True)
    expected = torch.autograd.grad(loss(leaves, x_leaf), [*leaves.values(), x_leaf])
    for actual, reference in zip([*functional[0].values(), functional[1]], expected, strict=True):
        torch.testing.assert_close(actual, reference, rtol=1e-12, atol=1e-12)


def test_a_failed_build_warns_once_and_the_layer_trains_on_the_python_path(monkeypatch):
    from torch.utils import cpp_extension

    def no_ninja(**_: object) -> None:
        msg = "Ninja is required to load C++ extensions"
        raise RuntimeError(msg)

    monkeypatch.setattr(cpp_extension, "load", no_ninja)
    hbn_torch.compiled_kernel_available.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"could not be built \(Ninja is required"):
            assert not hbn_torch.compiled_kernel_available()
        layer = hbn_torch.HybridBatchNorm2d(3)
        y = layer(torch.randn(4, 3, 2, 2, requires_grad=True))  # no second warning
        assert type(y.grad_fn).__name__ == "_FusedHybridBatchNormFunctionBackward"
    finally:
        hbn_torch.compiled_kernel_available.cache_clear()
