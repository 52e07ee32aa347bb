"""rl_plasticity: loss of plasticity in deep RL — agents, regularizers, diagnostics.

The public Python API, for using the toolbox on your own model (README: "Use the toolbox on your
own model"):

- `PlasticityMixin`: add it to your agent or trainer class; it adds the chosen regularizer's
  penalty to each registered network's loss (or gradient), runs the chosen interventions
  (effective-rank step, continual backprop, ReDo, resets, ...) after each update, and reports the plasticity diagnostics;
- `PlasticityConfig`: what `plasticity=<name>` sets on the command line; a name alone takes the
  paper's defaults (`PlasticityConfig(name="spectral")` has coef 1e-4);
- `REGULARIZERS` (name → class) and `Regularizer`, `register_regularizer` to add your own;
- `INTERVENTIONS` (name → class) and `Intervention`: the periodic surgeries
  (`PlasticityConfig(interventions=("redo",))`), see plasticity/interventions.py;
- `ConfigError`: what an unknown name or an impossible value raises (it names the valid choices);
- `FeatureRecorder`, `CReLU`: the hidden features of any network, and the CReLU activation.

The names are imported on first use, so `import rl_plasticity` stays light (no torch) for the
command-line entry points.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it.
_EXPORTS = {
    "PlasticityMixin": "rl_plasticity.plasticity.mixin",
    "PlasticityConfig": "rl_plasticity.plasticity.mixin",
    "REGULARIZERS": "rl_plasticity.plasticity.regularizers",
    "Regularizer": "rl_plasticity.plasticity.regularizers",
    "ConfigError": "rl_plasticity.config",
    "FeatureRecorder": "rl_plasticity.plasticity.layers",
    "CReLU": "rl_plasticity.ensemble",
    "INTERVENTIONS": "rl_plasticity.plasticity.interventions",
    "Intervention": "rl_plasticity.plasticity.interventions",
}
_RENAMED = {"register_regularizer": ("rl_plasticity.plasticity.regularizers", "register")}

__all__ = sorted([*_EXPORTS, *_RENAMED, "__version__"])

if TYPE_CHECKING:
    from rl_plasticity.ensemble import CReLU
    from rl_plasticity.config import ConfigError
    from rl_plasticity.plasticity.interventions import INTERVENTIONS, Intervention
    from rl_plasticity.plasticity.layers import FeatureRecorder
    from rl_plasticity.plasticity.mixin import PlasticityConfig, PlasticityMixin
    from rl_plasticity.plasticity.regularizers import REGULARIZERS, Regularizer
    from rl_plasticity.plasticity.regularizers import register as register_regularizer


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _RENAMED:
        module, attr = _RENAMED[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'rl_plasticity' has no attribute '{name}'")


def __dir__() -> list[str]:
    return __all__
