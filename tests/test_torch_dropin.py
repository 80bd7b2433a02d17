"""backends.torch as a drop-in for nn.BatchNorm: what code written for BatchNorm relies on.

Second-order gradients (gradient penalties), the constructor, empty batches, ``eps``,
``torch.nn.utils.parametrize`` and ``prune``, ``torch.func.vmap`` over stacked models, a float
``num_batches_tracked``, and large ``alpha`` in float32; on every training path. The oracles are
a plain torch-autograd composition of HBN's forward (autograd differentiates it to any order)
and torch's own BatchNorm.
"""

from __future__ import annotations

import copy
import inspect
import math

import pytest

torch = pytest.importorskip("torch")
hbn_torch = pytest.importorskip("backends.torch")

pytestmark = pytest.mark.torch

PATH_NAMES = ["compiled-kernel", "fused-kernels", "array-api-core"]
PATHS = pytest.mark.parametrize("path", PATH_NAMES)
LAYERS = {2: hbn_torch.HybridBatchNorm1d, 3: hbn_torch.HybridBatchNorm1d}
LAYERS |= {4: hbn_torch.HybridBatchNorm2d, 5: hbn_torch.HybridBatchNorm3d}
BATCHNORMS = {
    hbn_torch.HybridBatchNorm1d: torch.nn.BatchNorm1d,
    hbn_torch.HybridBatchNorm2d: torch.nn.BatchNorm2d,
    hbn_torch.HybridBatchNorm3d: torch.nn.BatchNorm3d,
}


def use_path(module: torch.nn.Module, path: str) -> None:
    """Make every HBN layer of ``module`` train on ``path``."""
    for _, layer in hbn_torch.hbn_layers(module):
        layer.use_compiled_kernel = path == "compiled-kernel"
        layer.use_fused_kernels = path != "array-api-core"
    if path == "compiled-kernel":
        assert hbn_torch.compiled_kernel_available()


def mix(alpha, batch, global_):
    """(1 - w) batch + w global, w = sigmoid(alpha), with autograd's d/dalpha exact at any alpha.

    torch differentiates sigmoid as y (1 - y), which loses 1 - y where y rounds to 1 (alpha
    past about 16 in float32, 30 in float64); the sigmoid whose output is small is exact.
    """
    gap = global_ - batch
    return torch.where(
        alpha >= 0, global_ - torch.sigmoid(-alpha) * gap, batch + torch.sigmoid(alpha) * gap
    )


def composition(x, weight, bias, alpha, global_mean, global_var, eps=1e-5):
    """HBN's training forward as plain autograd ops: the oracle for gradients of any order."""
    dims = [0, *range(2, x.dim())]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = mix(alpha, x.mean(dims), global_mean)
    var = mix(alpha, x.var(dims, unbiased=False), global_var)
    x_hat = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    return weight.view(shape) * x_hat + bias.view(shape)


class CompositionNorm(torch.nn.Module):
    """An HBN layer's parameters and buffers, applied through :func:`composition`."""

    def __init__(self, layer: hbn_torch.HybridBatchNorm) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.layer
        return composition(x, m.weight, m.bias, m.alpha, m.global_mean, m.global_var, m.eps)


def random_layer(layer_type, channels: int, *, seed: int, **kwargs):
    torch.manual_seed(seed)
    layer = layer_type(channels, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        for p in (layer.weight, layer.bias, layer.alpha, layer.global_mean):
            if p is not None:
                p.normal_()
        layer.global_var.uniform_(0.5, 2)
    return layer


# --- second-order gradients ---------------------------------------------------------------


@PATHS
@pytest.mark.parametrize("shape", [(5, 3), (4, 2, 3), (3, 2, 2, 3), (2, 2, 2, 2, 2)])
def test_gradgradcheck_in_float64(shape, path):
    layer = random_layer(LAYERS[len(shape)], shape[1], seed=sum(shape))
    use_path(layer, path)

    def call(x, weight, bias, alpha):
        parameters = {"weight": weight, "bias": bias, "alpha": alpha}
        return torch.func.functional_call(layer, parameters, (x,))

    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    parameters = [getattr(layer, k).detach().clone() for k in ("weight", "bias", "alpha")]
    inputs = [x] + [p.requires_grad_() for p in parameters]
    assert torch.autograd.gradgradcheck(call, inputs, check_batched_grad=True)


@PATHS
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 3, 4, 4)])
def test_hessian_vector_products_equal_the_composition(shape, path):
    """d/d(x, weight, bias, alpha) of a loss on dL/dx, against the composition's, to 1e-10."""
    layer = random_layer(LAYERS[len(shape)], shape[1], seed=len(shape))
    use_path(layer, path)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    leaves = [x, layer.weight, layer.bias, layer.alpha]

    def second_order(module):
        y = module(x)
        (dx,) = torch.autograd.grad((y * y.detach().sin()).sum(), x, create_graph=True)
        return torch.autograd.grad(dx.pow(2).sum(), leaves, materialize_grads=True)

    expected = second_order(CompositionNorm(layer))
    for actual, reference in zip(second_order(layer), expected, strict=True):
        torch.testing.assert_close(actual, reference, rtol=1e-10, atol=1e-10)


def critic(norm) -> torch.nn.Module:
    torch.manual_seed(7)
    conv, head = torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.Linear(4 * 6 * 6, 1)
    return torch.nn.Sequential(conv, norm, torch.nn.ReLU(), torch.nn.Flatten(), head).double()


@PATHS
def test_wgan_gp_gradient_penalty_equals_the_composition(path):
    """The penalty ((||dD/dx|| - 1)^2) and its gradients for every parameter of the critic."""
    hbn = random_layer(hbn_torch.HybridBatchNorm2d, 4, seed=8)
    model = critic(hbn)
    use_path(model, path)
    reference = critic(CompositionNorm(hbn))
    torch.manual_seed(9)
    real, fake = torch.randn(2, 5, 2, 6, 6, dtype=torch.float64)
    mix = torch.rand(5, 1, 1, 1, dtype=torch.float64)

    def penalty_and_gradients(d):
        x = (mix * real + (1 - mix) * fake).requires_grad_(True)
        (dx,) = torch.autograd.grad(d(x).sum(), x, create_graph=True)
        penalty = (dx.flatten(1).norm(dim=1) - 1).pow(2).mean()
        return penalty, torch.autograd.grad(penalty, list(d.parameters()), materialize_grads=True)

    penalty, grads = penalty_and_gradients(model)
    expected_penalty, expected_grads = penalty_and_gradients(reference)
    torch.testing.assert_close(penalty, expected_penalty, rtol=1e-12, atol=1e-12)
    assert len(grads) == len(expected_grads)
    for actual, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-11)


# --- constructor ----------------------------------------------------------------------------


@pytest.mark.parametrize("hbn_type", list(BATCHNORMS))
def test_constructor_signature_is_batchnorms(hbn_type):
    def parameters(cls):
        return [
            (p.name, p.kind, p.default) for p in inspect.signature(cls.__init__).parameters.values()
        ]

    assert parameters(hbn_type) == parameters(BATCHNORMS[hbn_type])


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"bias": False},
        {"affine": False},
        {"eps": 1e-3, "momentum": None, "track_running_stats": False},
        {"momentum": 0.3, "affine": False, "bias": False},
    ],
)
def test_attributes_state_and_repr_are_batchnorms(kwargs):
    hbn, bn = hbn_torch.HybridBatchNorm2d(3, **kwargs), torch.nn.BatchNorm2d(3, **kwargs)
    assert repr(hbn) == repr(bn).replace("BatchNorm2d", "HybridBatchNorm2d")
    for name in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(hbn, name) == getattr(bn, name), name
    hbn_only = {"alpha", "global_mean", "global_var"}
    assert [k for k in hbn.state_dict() if k not in hbn_only] == list(bn.state_dict())
    for name, value in bn.state_dict().items():
        torch.testing.assert_close(hbn.state_dict()[name], value, rtol=0, atol=0)
    assert [n for n, _ in hbn.named_parameters()] == [n for n, _ in bn.named_parameters()] + [
        "alpha"
    ]


@PATHS
def test_bias_false_has_no_offset(path):
    layer = random_layer(hbn_torch.HybridBatchNorm2d, 3, seed=10, bias=False)
    use_path(layer, path)
    assert layer.bias is None
    assert [name for name, _ in layer.named_parameters()] == ["weight", "alpha"]
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    zeros = torch.zeros(3, dtype=torch.float64)
    g = layer.global_mean, layer.global_var
    expected = composition(x, layer.weight, zeros, layer.alpha, *g)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(y.pow(3).sum(), [x, layer.weight, layer.alpha])
    expected_grads = torch.autograd.grad(expected.pow(3).sum(), [x, layer.weight, layer.alpha])
    for actual, reference in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(actual, reference, rtol=1e-10, atol=1e-10)
    layer.eval()
    global_only = torch.full_like(zeros, math.inf)  # alpha = inf: w = 1
    torch.testing.assert_close(layer(x), composition(x, layer.weight, zeros, global_only, *g))


def test_reset_parameters_restores_the_constructed_state():
    layer = random_layer(hbn_torch.HybridBatchNorm2d, 3, seed=11)
    layer(torch.randn(4, 3, 2, 2, dtype=torch.float64))
    fresh = hbn_torch.HybridBatchNorm2d(3, dtype=torch.float64)
    layer.reset_parameters()
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_reset_running_stats_is_batchnorms():
    hbn, bn = hbn_torch.HybridBatchNorm2d(3), torch.nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    hbn(x), bn(x)
    hbn.reset_running_stats(), bn.reset_running_stats()
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(hbn, name), getattr(bn, name), rtol=0, atol=0)
    assert hbn.global_var.eq(1).all()  # the global statistics are not running statistics


def test_convert_batchnorm_keeps_bias_false():
    bn = torch.nn.BatchNorm2d(3, bias=False)
    with torch.no_grad():
        bn.weight.normal_()
    hbn = hbn_torch.convert_batchnorm(bn)
    assert hbn.bias is None
    torch.testing.assert_close(hbn.weight, bn.weight)


# --- empty batches ------------------------------------------------------------------------


@PATHS
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (0, 3, 2, 2), (4, 3, 0), (2, 3, 0, 2, 2)])
def test_an_empty_training_batch_gives_an_empty_output_as_batchnorm(shape, path):
    hbn_type = LAYERS[len(shape)]
    hbn, bn = hbn_type(3), BATCHNORMS[hbn_type](3)
    use_path(hbn, path)
    x = torch.randn(shape, requires_grad=True)
    y, expected = hbn(x), bn(x)
    assert y.shape == expected.shape == x.shape
    assert y.dtype == x.dtype
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(hbn, name), getattr(bn, name), rtol=0, atol=0)
    grads = torch.autograd.grad(y.sum(), [x, hbn.weight, hbn.bias, hbn.alpha])
    expected_grads = torch.autograd.grad(expected.sum(), [x, bn.weight, bn.bias])
    for actual, reference in zip(grads, expected_grads, strict=False):
        torch.testing.assert_close(actual, reference, rtol=0, atol=0)
    torch.testing.assert_close(grads[-1], torch.zeros(3), rtol=0, atol=0)  # alpha takes part


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_an_empty_batch_keeps_the_input_dtype(dtype):
    x = torch.randn(0, 3, 2, 2, dtype=dtype, requires_grad=True)
    hbn, bn = hbn_torch.HybridBatchNorm2d(3), torch.nn.BatchNorm2d(3)
    y = hbn(x)
    assert y.dtype == bn(x).dtype == dtype
    (dx,) = torch.autograd.grad(y.sum(), x)
    assert dx.dtype == dtype


def test_an_empty_batch_in_collection_and_eval_gives_an_empty_output():
    layer = hbn_torch.HybridBatchNorm2d(3)
    x = torch.randn(0, 3, 2, 2)
    assert layer.eval()(x).shape == x.shape
    with hbn_torch.collect_statistics(torch.nn.Sequential(layer)) as stats:
        assert layer(x).shape == x.shape
    assert int(stats["0"].count) == 0


# --- eps --------------------------------------------------------------------------------------

BAD_EPS = [-1.0, -0.0, 0.0, math.nan, math.inf, -math.inf]


@PATHS
@pytest.mark.parametrize("eps", BAD_EPS)
def test_training_refuses_eps_that_is_not_positive_and_finite(eps, path):
    layer = hbn_torch.HybridBatchNorm2d(3, eps=eps)
    use_path(layer, path)
    pattern = r"HybridBatchNorm2d: eps must be positive and finite during training; got "
    with pytest.raises(ValueError, match=pattern):
        layer(torch.randn(4, 3, 2, 2))
    model = torch.nn.Sequential(layer)
    with pytest.raises(ValueError, match=pattern), hbn_torch.collect_statistics(model):
        model(torch.randn(4, 3, 2, 2))


@pytest.mark.parametrize("eps", [e for e in BAD_EPS if e != 0])
def test_eval_refuses_eps_that_is_negative_or_not_finite(eps):
    layer = hbn_torch.HybridBatchNorm1d(3, eps=eps).eval()
    with pytest.raises(ValueError, match=r"eps must be non-negative and finite; got "):
        layer(torch.randn(4, 3))
    model = torch.nn.Sequential(layer)
    with (
        pytest.raises(ValueError, match=r"non-negative"),
        hbn_torch.collect_statistics(model, mode="global"),
    ):
        model(torch.randn(4, 3))


def test_eps_zero_is_allowed_in_eval_as_in_batchnorm():
    hbn = hbn_torch.HybridBatchNorm1d(3, eps=0.0).eval()
    bn = torch.nn.BatchNorm1d(3, eps=0.0).eval()
    x = torch.randn(4, 3)
    torch.testing.assert_close(hbn(x), bn(x))


def test_the_compiled_operator_refuses_bad_eps_and_empty_inputs_itself():
    assert hbn_torch.compiled_kernel_available()
    operator, c, no_running = torch.ops.hbn.hybrid_batch_norm, torch.ones(3), (None,) * 3
    with pytest.raises(RuntimeError, match=r"eps must be positive and finite during training"):
        operator(torch.randn(4, 3), c, c, c, c, c, *no_running, 0.1, -1.0)
    with pytest.raises(RuntimeError, match=r"takes a non-empty input"):
        operator(torch.randn(0, 3), c, c, c, c, c, *no_running, 0.1, 1e-5)


# --- parametrize and prune ----------------------------------------------------------------


class Doubled(torch.nn.Module):
    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return 2 * value


@PATHS
@pytest.mark.parametrize("name", ["weight", "alpha"])
def test_parametrize_on_weight_or_alpha_trains(name, path):
    from torch.nn.utils import parametrize

    layer = random_layer(hbn_torch.HybridBatchNorm2d, 3, seed=12)
    use_path(layer, path)
    plain = copy.deepcopy(layer)
    with torch.no_grad():
        getattr(plain, name).mul_(2)
    parametrize.register_parametrization(layer, name, Doubled())
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    y, expected = layer(x), plain(x)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    original = layer.parametrizations[name].original
    (grad,) = torch.autograd.grad(y.pow(3).sum(), original)
    (expected_grad,) = torch.autograd.grad(expected.pow(3).sum(), getattr(plain, name))
    torch.testing.assert_close(grad, 2 * expected_grad, rtol=1e-10, atol=1e-10)
    for buffer in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(layer, buffer), getattr(plain, buffer))
    torch.testing.assert_close(layer.eval()(x), plain.eval()(x), rtol=1e-12, atol=1e-12)


@PATHS
@pytest.mark.parametrize("name", ["weight", "alpha"])
def test_prune_on_weight_or_alpha_trains(name, path):
    from torch.nn.utils import prune

    layer = random_layer(hbn_torch.HybridBatchNorm2d, 4, seed=13)
    use_path(layer, path)
    plain = copy.deepcopy(layer)
    prune.l1_unstructured(layer, name, amount=2)
    mask = getattr(layer, f"{name}_mask")
    assert int(mask.sum()) == 2
    with torch.no_grad():
        getattr(plain, name).mul_(mask)
    x = torch.randn(4, 4, 2, 2, dtype=torch.float64)
    y, expected = layer(x), plain(x)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(y.pow(3).sum(), getattr(layer, f"{name}_orig"))
    (expected_grad,) = torch.autograd.grad(expected.pow(3).sum(), getattr(plain, name))
    torch.testing.assert_close(grad, mask * expected_grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.eval()(x), plain.eval()(x), rtol=1e-12, atol=1e-12)


# --- vmap over stacked models ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("norm", "path"), [*(("hbn", path) for path in PATH_NAMES), ("batchnorm", "torch")]
)
def test_vmap_over_stacked_models_in_training_equals_a_loop(norm, path):
    """An ensemble (or vectorised clients) of CNNs: outputs and parameter gradients.

    The same holds for torch's BatchNorm with ``track_running_stats=False``, the reference.
    """

    def cnn(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        layer = (
            random_layer(hbn_torch.HybridBatchNorm2d, 4, seed=seed, track_running_stats=False)
            if norm == "hbn"
            else torch.nn.BatchNorm2d(4, track_running_stats=False, dtype=torch.float64)
        )
        model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3).double(), layer, torch.nn.Tanh())
        use_path(model, path)
        return model

    models = [cnn(seed) for seed in range(3)]
    parameters, buffers = torch.func.stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(3, 5, 2, 4, 4, dtype=torch.float64)

    def loss(parameters, buffers, x):
        return torch.func.functional_call(skeleton, (parameters, buffers), (x,)).pow(3).sum()

    losses = torch.vmap(loss)(parameters, buffers, x)
    grads = torch.vmap(torch.func.grad(loss))(parameters, buffers, x)
    for i, model in enumerate(models):
        expected = model(x[i]).pow(3).sum()
        torch.testing.assert_close(losses[i], expected, rtol=1e-12, atol=1e-12)
        expected_grads = torch.autograd.grad(expected, list(model.parameters()))
        for (name, _), reference in zip(model.named_parameters(), expected_grads, strict=True):
            torch.testing.assert_close(grads[name][i], reference, rtol=1e-10, atol=1e-12)


# --- a float num_batches_tracked ----------------------------------------------------------


@PATHS
@pytest.mark.parametrize("momentum", [0.1, None])
def test_a_float_num_batches_tracked_after_fedavg_counts_on_as_in_batchnorm(momentum, path):
    def fedavg(models):
        states = [m.state_dict() for m in models]
        return {k: sum(s[k] for s in states) / len(states) for k in states[0]}

    def trained(norm_type, seed):
        torch.manual_seed(seed)
        layer = norm_type(3, momentum=momentum, dtype=torch.float64)
        for _ in range(seed + 1):
            layer(torch.randn(6, 3, 2, 2, dtype=torch.float64))
        return layer

    hbn = hbn_torch.HybridBatchNorm2d(3, momentum=momentum, dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(3, momentum=momentum, dtype=torch.float64)
    use_path(hbn, path)
    for layer, norm_type in ((hbn, hbn_torch.HybridBatchNorm2d), (bn, torch.nn.BatchNorm2d)):
        layer.load_state_dict(fedavg([trained(norm_type, s) for s in (0, 1, 2, 4)]), assign=True)
    assert hbn.num_batches_tracked.dtype == bn.num_batches_tracked.dtype
    assert hbn.num_batches_tracked.is_floating_point()
    assert float(hbn.num_batches_tracked) == 2.75  # (1 + 2 + 3 + 5) / 4 batches
    for _ in range(3):
        x = 1 + 2 * torch.randn(6, 3, 2, 2, dtype=torch.float64)
        hbn(x), bn(x)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(hbn, name), getattr(bn, name), rtol=1e-12, atol=1e-12)


# --- large alpha in float32 -----------------------------------------------------------------


@PATHS
@pytest.mark.parametrize("alpha", [16.0, 20.0, 30.0, -16.0, -30.0])
def test_large_alpha_gradients_in_float32_equal_float64(alpha, path):
    """At alpha >= 16, w = sigmoid(alpha) rounds to 1 in float32: 1 - w is no difference."""
    torch.manual_seed(14)
    x64 = 3 + 2 * torch.randn(8, 3, 4, 4, dtype=torch.float64)
    dy64 = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    layer = hbn_torch.HybridBatchNorm2d(3)
    use_path(layer, path)
    with torch.no_grad():
        layer.alpha.fill_(alpha)
        layer.global_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        layer.global_var.copy_(torch.tensor([0.5, 2.0, 4.0]))
    x = x64.float().requires_grad_(True)
    grads = torch.autograd.grad(layer(x), [x, layer.alpha], dy64.float())
    leaves = [x64.requires_grad_(True), layer.alpha.detach().double().requires_grad_(True)]
    one, zero = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    g = layer.global_mean.double(), layer.global_var.double()
    expected = torch.autograd.grad(composition(leaves[0], one, zero, leaves[1], *g), leaves, dy64)
    dalpha, expected_dalpha = grads[1].double(), expected[1]
    assert (expected_dalpha.abs() > 0).all()
    torch.testing.assert_close(dalpha, expected_dalpha, rtol=1e-4, atol=0)
    torch.testing.assert_close(grads[0].double(), expected[0], rtol=1e-4, atol=1e-4)


# --- torch.export ---------------------------------------------------------------------------


@PATHS
@pytest.mark.parametrize("training", [True, False])
def test_torch_export_matches_eager(training, path):
    """In training, the exported program normalises, differentiates and updates as eager."""
    torch.manual_seed(15)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), hbn_torch.HybridBatchNorm2d(4))
    model = model.double().train(training)
    with torch.no_grad():
        model[1].alpha.normal_(), model[1].global_var.uniform_(0.5, 2)
    use_path(model, path)
    eager = copy.deepcopy(model)
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    exported = torch.export.export(model, (x,)).module()
    y, expected = exported(x), eager(x)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    # In eval mode alpha takes no part: zeros for it in both.
    grads = torch.autograd.grad(y.pow(3).sum(), list(exported.parameters()), materialize_grads=True)
    expected_grads = torch.autograd.grad(
        expected.pow(3).sum(), list(eager.parameters()), materialize_grads=True
    )
    for actual, reference in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(actual, reference, rtol=1e-10, atol=1e-12)
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], value, rtol=1e-12, atol=0)


# --- torch.func.jacrev, half precision ------------------------------------------------------


@PATHS
def test_jacrev_equals_autograd_rows(path):
    layer = random_layer(hbn_torch.HybridBatchNorm1d, 3, seed=16, track_running_stats=False)
    use_path(layer, path)
    x = torch.randn(5, 3, dtype=torch.float64)

    def per_channel_sum(alpha, x):
        parameters = {"weight": layer.weight, "bias": layer.bias, "alpha": alpha}
        return torch.func.functional_call(layer, parameters, (x,)).pow(3).sum(dim=0)

    alpha = layer.alpha.detach()
    jacobians = torch.func.jacrev(per_channel_sum, argnums=(0, 1))(alpha, x)
    leaves = [alpha.clone().requires_grad_(True), x.clone().requires_grad_(True)]
    out = per_channel_sum(*leaves)
    for row in range(3):
        expected = torch.autograd.grad(out[row], leaves, retain_graph=True)
        for jacobian, reference in zip(jacobians, expected, strict=True):
            torch.testing.assert_close(jacobian[row], reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_trains_on_the_core_path_in_float32(dtype):
    layer = random_layer(hbn_torch.HybridBatchNorm2d, 3, seed=17).to(dtype)
    x = torch.randn(6, 3, 4, 4).to(dtype).requires_grad_(True)
    y = layer(x)
    assert y.dtype == dtype
    assert type(y.grad_fn).__name__ == "_HybridBatchNormFunctionBackward"
    x64, *state = (t.detach().double().requires_grad_(True) for t in (x, layer.weight, layer.alpha))
    expected = composition(
        x64, state[0], layer.bias.double(), state[1], layer.global_mean.double(),
        layer.global_var.double(),
    )  # fmt: skip
    torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=2e-2)
    grads = torch.autograd.grad(y.float().pow(2).sum(), [x, layer.weight, layer.alpha])
    expected_grads = torch.autograd.grad(expected.pow(2).sum(), [x64, *state])
    for actual, reference in zip(grads, expected_grads, strict=True):
        scale = 1 + reference.abs().max()
        torch.testing.assert_close(actual.double(), reference, rtol=5e-2, atol=5e-2 * scale)


def test_autocast_bfloat16_trains_as_in_float32():
    torch.manual_seed(18)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), hbn_torch.HybridBatchNorm2d(3))
    x = torch.randn(4, 2, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    reference = copy.deepcopy(model)
    expected = reference(x)
    torch.testing.assert_close(y.float(), expected, rtol=5e-2, atol=5e-2)
    grads = torch.autograd.grad(y.float().sum(), list(model.parameters()))
    expected_grads = torch.autograd.grad(expected.sum(), list(reference.parameters()))
    for actual, ref in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(actual, ref, rtol=5e-2, atol=5e-2 * (1 + ref.abs().max()))


# --- what is not supported fails loudly, never with wrong numbers ---------------------------

# torch deprecates TorchScript, and its forward-mode AD scripts its decompositions on first use.
TORCHSCRIPT_DEPRECATED = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)


@TORCHSCRIPT_DEPRECATED
@PATHS
@pytest.mark.parametrize("api", ["torch.func.jvp", "forward_ad"])
def test_forward_mode_ad_in_training_raises_instead_of_giving_tangents(api, path):
    """docs/backends/torch.md: HBN's autograd Functions define no jvp, so forward mode raises."""
    layer = random_layer(hbn_torch.HybridBatchNorm2d, 3, seed=19)
    use_path(layer, path)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)

    def tangent_of_output() -> object:
        if api == "torch.func.jvp":
            return torch.func.jvp(layer, (x,), (torch.ones_like(x),))
        with torch.autograd.forward_ad.dual_level():
            return layer(torch.autograd.forward_ad.make_dual(x, torch.ones_like(x)))

    # torch's Python Functions say so; the C++ operator's Function says jvp is not implemented.
    with pytest.raises((NotImplementedError, RuntimeError), match="jvp"):
        tangent_of_output()


@TORCHSCRIPT_DEPRECATED
def test_forward_mode_ad_works_in_eval_mode():
    """Eval mode is plain torch ops: its jvp is BatchNorm's affine map, checked against vjp rows."""
    layer = random_layer(hbn_torch.HybridBatchNorm1d, 3, seed=20).eval()
    x, tangent = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    _, jvp = torch.func.jvp(layer, (x,), (tangent,))
    scale = layer.weight / torch.sqrt(layer.global_var + layer.eps)
    torch.testing.assert_close(jvp, tangent * scale.detach(), rtol=1e-12, atol=1e-12)


@TORCHSCRIPT_DEPRECATED
def test_torchscript_is_refused_at_scripting():
    """docs/backends/torch.md: ``torch.jit.script`` cannot compile the layer (Python-only code)."""
    with pytest.raises(RuntimeError):
        torch.jit.script(hbn_torch.HybridBatchNorm2d(3))
