"""The reference models in PyTorch, behind :class:`federation.models.FrameworkModel`.

Torch's ``state_dict`` names are the canonical names, and its layouts (OIHW, ``(out, in)``,
NCHW) are the canonical layouts, so this adapter converts only dtypes. HBN layers are built with
``track_running_stats=False``: in a federation their statistics are the server's global ones.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from torch import nn

from backends import torch as hbn_torch
from federation.layout import HBNPart, HBNTensor, Layout
from federation.models import (
    GROUPS,
    Batch,
    CollectionMode,
    EvalResult,
    ModelSpec,
    SGDConfig,
    TrainResult,
    check_known_names,
    native_tensor_spec,
    trainable_batches,
)
from hbn_core import Moments

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping

__all__ = ["TorchModel", "build", "torch_layout", "torch_moments"]


def _norm(spec: ModelSpec, channels: int, *, spatial: bool) -> nn.Module:
    if spec.norm == "hbn":
        layer_type = hbn_torch.HybridBatchNorm2d if spatial else hbn_torch.HybridBatchNorm1d
        layer = layer_type(channels, eps=spec.eps, track_running_stats=False)
        if spec.hybrid == "global":
            with torch.no_grad():
                layer.alpha.fill_(math.inf)
            layer.alpha.requires_grad_(False)
        return layer
    if spec.norm == "bn":
        return (nn.BatchNorm2d if spatial else nn.BatchNorm1d)(channels, eps=spec.eps)
    if spec.norm in ("gn", "ln"):
        return nn.GroupNorm(GROUPS[spec.norm], channels, eps=spec.eps)
    return nn.Identity()


class _Network(nn.Module):
    """Simple-CNN or MLP, with the spec's canonical module names as attributes."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        for layer in spec.layers():
            if layer.kind == "conv":
                module: nn.Module = nn.Conv2d(layer.in_features, layer.out_features, 3, padding=1)
            elif layer.kind == "dense":
                module = nn.Linear(layer.in_features, layer.out_features)
            else:
                module = _norm(spec, layer.out_features, spatial=spec.architecture != "mlp")
            self.add_module(layer.name, module)

    def _norm_or_identity(self, name: str) -> nn.Module:
        return getattr(self, name, nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.architecture == "mlp":
            x = F.relu(self._norm_or_identity("norm1")(self.fc1(self._features(x.flatten(1)))))
            return self.fc2(x)
        for index in range(1, len(self.spec.channels) + 1):
            x = getattr(self, f"conv{index}")(x)
            x = F.max_pool2d(F.relu(self._norm_or_identity(f"norm{index}")(x)), 2)
        return self.fc2(F.relu(self.fc1(self._features(x.flatten(1)))))

    def _features(self, z: torch.Tensor) -> torch.Tensor:
        r"""FedFN's :math:`\sqrt{d}\, z / \lVert z \rVert_2` if the spec asks for it."""
        if not self.spec.feature_norm:
            return z
        return F.normalize(z, dim=1, eps=1e-12) * math.sqrt(z.shape[1])


@torch.no_grad()
def _clip_by_global_norm(parameters: list[nn.Parameter], clip_norm: float) -> None:
    r"""Scale the gradients by :math:`\min(1, c / \lVert g \rVert_2)`, exactly.

    Not ``torch.nn.utils.clip_grad_norm_``, which divides by :math:`\lVert g \rVert_2 +
    10^{-6}`: the federation's other frameworks (optax, our Keras optimiser) clip exactly, and
    that 1e-6 alone made torch's float64 federations differ from theirs by 1e-8.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    torch._foreach_mul_(grads, torch.clamp(clip_norm / norm, max=1.0))


class TorchModel:
    """A reference model in PyTorch (CPU, in the spec's dtype), driven by the federation."""

    def __init__(self, spec: ModelSpec, *, seed: int) -> None:
        self.spec = spec
        self.layout = spec.layout()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.network = _Network(spec).to(getattr(torch, spec.dtype))

    def _batchnorms(self) -> Iterator[nn.modules.batchnorm._BatchNorm]:
        """The network's BatchNorm layers (the ``bn`` baselines; HBN layers are not among them)."""
        for module in self.network.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                yield module

    def _tensor(self, images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(images, self.spec.dtype))

    def get_state(self) -> dict[str, np.ndarray]:
        """Every canonical tensor, copied to NumPy."""
        state = self.network.state_dict()
        return {name: state[name].detach().numpy().copy() for name in self.layout}

    @torch.no_grad()
    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Load every canonical tensor; reset the local counters (``num_batches_tracked``)."""
        for module in self._batchnorms():
            module.reset_running_stats()
        own = self.network.state_dict()
        for name in self.layout:
            own[name].copy_(torch.from_numpy(np.asarray(state[name], self.spec.dtype)))

    @torch.no_grad()
    def collect_statistics(
        self, inputs: Iterable[np.ndarray], mode: CollectionMode
    ) -> dict[str, Moments]:
        """HBN input moments over ``inputs``, by :func:`backends.torch.collect_statistics`."""
        self.network.eval()
        with hbn_torch.collect_statistics(self.network, mode=mode) as collected:
            for x in inputs:
                self.network(self._tensor(x))
        return {name: Moments(*(t.numpy() for t in moments)) for name, moments in collected.items()}

    def train(
        self, batches: Iterable[Batch], sgd: SGDConfig, *, freeze_statistics: bool = False
    ) -> TrainResult:
        """SGD on ``batches`` with a fresh optimiser, as :class:`SGDConfig` says.

        ``freeze_statistics`` puts BatchNorm layers in eval mode: they normalise with their
        running statistics and leave them unchanged; weight and bias still train.
        """
        self.network.train()
        if freeze_statistics:
            for module in self._batchnorms():
                module.eval()
        parameters = [p for p in self.network.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(
            parameters, lr=sgd.lr, momentum=sgd.momentum, weight_decay=sgd.weight_decay
        )
        loss_sum, examples, steps = 0.0, 0, 0
        for x, y in trainable_batches(batches, self.spec, freeze_statistics=freeze_statistics):
            loss = F.cross_entropy(self.network(self._tensor(x)), torch.from_numpy(y))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if sgd.clip_norm is not None:
                _clip_by_global_norm(parameters, sgd.clip_norm)
            optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
            examples += len(y)
            steps += 1
        return TrainResult(loss_sum, examples, steps)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> EvalResult:
        """Summed cross-entropy and correct predictions in eval mode."""
        self.network.eval()
        loss_sum, correct, examples = 0.0, 0, 0
        for x, y in batches:
            logits = self.network(self._tensor(x))
            labels = torch.from_numpy(y)
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(1) == labels).sum())
            examples += len(y)
        return EvalResult(loss_sum, correct, examples)


def build(spec: ModelSpec, *, seed: int) -> TorchModel:
    """Build ``spec`` in PyTorch, its initial weights drawn from ``seed``."""
    return TorchModel(spec, seed=seed)


def torch_layout(module: nn.Module) -> Layout:
    """The canonical layout of a torch model, e.g. one converted with ``convert_batchnorm``.

    Roles come from the layer types: each :class:`~backends.torch.HybridBatchNorm`'s
    ``global_mean`` and ``global_var`` are ``statistics``, its ``alpha`` and local running
    statistics ``personal``; every other parameter and floating buffer is ``shared``; integer
    counters (``num_batches_tracked``) are left out. Names and shapes are the ``state_dict``'s.
    4-D tensors are conv kernels, 2-D ones dense kernels (what a channels-last conversion
    needs; a dense layer after a flatten is not marked, so this layout serves torch nodes).
    """
    layout: Layout = {}
    for prefix, layer in module.named_modules():
        tensors = {
            **dict(layer.named_parameters(recurse=False)),
            **dict(layer.named_buffers(recurse=False)),
        }
        is_hbn = isinstance(layer, hbn_torch.HybridBatchNorm)
        for local, tensor in tensors.items():
            if tensor is None or not tensor.is_floating_point():
                continue
            name = f"{prefix}.{local}" if prefix else local
            part = HBNTensor(prefix, HBNPart(local)) if is_hbn and local in _HBN_PARTS else None
            layout[name] = native_tensor_spec(
                tuple(tensor.shape), hbn=part, personal=is_hbn and local.startswith("running_")
            )
    return layout


_HBN_PARTS = {part.value for part in HBNPart}


@torch.no_grad()
def torch_moments(
    module: nn.Module,
    state: Mapping[str, np.ndarray],
    batches: Iterable[Any],
    *,
    mode: CollectionMode = "hybrid",
) -> tuple[dict[str, Moments], int]:
    """The statistics step on a torch model of your own: each HBN layer's input moments.

    ``state`` (tensors by ``state_dict`` name, as :func:`torch_layout` names them) is copied
    into ``module`` first, each tensor cast to the module's; ``module``'s other tensors (its
    alpha) stay. Each batch of ``batches`` (model inputs, anything ``torch.as_tensor`` takes)
    then runs forward in eval mode inside :func:`backends.torch.collect_statistics`; the
    module's training mode is restored afterwards.

    Returns the moments and examples and raises as :func:`~federation.models.check_known_names`
    describes.
    """
    own = module.state_dict()
    check_known_names(state, own, "tensors of the module's state_dict")
    for name, value in state.items():
        own[name].copy_(torch.from_numpy(np.asarray(value)))
    training = module.training
    module.eval()
    examples = 0
    try:
        with hbn_torch.collect_statistics(module, mode=mode) as collected:
            for batch in batches:
                inputs = torch.as_tensor(batch)
                module(inputs)
                examples += len(inputs)
    finally:
        module.train(training)
    moments = {name: Moments(*(t.cpu().numpy() for t in m)) for name, m in collected.items()}
    return moments, examples
