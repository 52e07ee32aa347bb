"""Finding the parameters and features the plasticity code works on, in any network.

Networks are walked module by module: linear layers (plain, convolutional, or batched ensemble
members) give weight matrices and biases, LayerNorms give gains and biases, ReLUs (and CReLUs,
whose 2n features are their layer's features) mark the post-activation features of hidden
layers.  Ensemble parameters keep their member dimension first, so each member is regularized
and measured as its own layer.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import nn

from rl_plasticity.ensemble import LINEAR_LAYERS, NORM_LAYERS, EnsembleLayerNorm, EnsembleLinear, chain_blocks


@dataclass
class WeightMatrix:
    """A weight as a batch of matrices (members, rows, cols); conv kernels as (out, in·kh·kw)."""

    name: str
    param: nn.Parameter
    kind: str  # "linear", "ensemble", "conv"

    def matrices(self, tensor: torch.Tensor | None = None) -> torch.Tensor:
        w = self.param if tensor is None else tensor
        if self.kind == "ensemble":
            return w  # (members, in, out): σ₁ is the same for the transpose
        if self.kind == "conv":
            return w.reshape(1, w.shape[0], -1)
        return w.unsqueeze(0)


@dataclass
class Vector:
    """A bias or LayerNorm parameter as (members, n)."""

    name: str
    param: nn.Parameter
    kind: str  # "bias", "ln_gain", "ln_bias"
    ensemble: bool

    def rows(self, tensor: torch.Tensor | None = None) -> torch.Tensor:
        v = self.param if tensor is None else tensor
        return v.reshape(v.shape[0], -1) if self.ensemble else v.reshape(1, -1)


def weights_and_vectors(network: nn.Module) -> tuple[list[WeightMatrix], list[Vector]]:
    """Every parameter of `network` classified; a parameter of any other module is an error."""
    weights: list[WeightMatrix] = []
    vectors: list[Vector] = []
    seen: set[int] = set()
    for mod_name, module in network.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, LINEAR_LAYERS):
            ens = isinstance(module, EnsembleLinear)
            kind = "ensemble" if ens else ("linear" if isinstance(module, nn.Linear) else "conv")
            weights.append(WeightMatrix(prefix + "weight", module.weight, kind))
            seen.add(id(module.weight))
            if module.bias is not None:
                vectors.append(Vector(prefix + "bias", module.bias, "bias", ens))
                seen.add(id(module.bias))
        elif isinstance(module, NORM_LAYERS):
            ens = isinstance(module, EnsembleLayerNorm)
            if module.weight is not None:
                vectors.append(Vector(prefix + "weight", module.weight, "ln_gain", ens))
                seen.add(id(module.weight))
            if module.bias is not None:
                vectors.append(Vector(prefix + "bias", module.bias, "ln_bias", ens))
                seen.add(id(module.bias))
    for name, p in network.named_parameters():
        if id(p) not in seen:
            raise TypeError(f"parameter '{name}' of {type(network).__name__} is in a layer the plasticity code "
                            f"does not know (linear, conv, ensemble linear, LayerNorm)")
    return weights, vectors


def hidden_activations(network: nn.Module) -> list[nn.Module]:
    """The activations (ReLU, CReLU) of `network`'s `chain_blocks`, in order: their outputs are
    the hidden features (a CReLU layer of n units gives 2n features, [relu(z), relu(−z)])."""
    return [block.activation for block in chain_blocks(network) if block.activation is not None]


class FeatureRecorder:
    """Context manager collecting the output of every hidden activation during a forward pass.

    Features come back as (members, batch, width): a plain network has one member.  They are
    copies, since in general an activation's output may be overwritten in place later in the
    forward; `copy=False` keeps the outputs themselves (no copy), for networks whose forward
    writes nothing in place after its activations (the package's MLPs: an in-place ReLU writes
    into its own input, and the next linear layer only reads its output).
    """

    def __init__(self, network: nn.Module, detach: bool = True, copy: bool = True):
        self.modules = hidden_activations(network)
        self.detach = detach
        self.copy = copy
        self.features: list[torch.Tensor] = []
        self._handles: list = []

    def __enter__(self) -> "FeatureRecorder":
        def hook(_module, _inputs, output):
            out = output.detach() if self.detach else output
            if self.copy:
                out = out.clone()
            self.features.append(out if out.dim() == 3 else out.reshape(1, -1, out.shape[-1]))

        self._handles = [m.register_forward_hook(hook) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
