"""lictrain: train learned image compression models faster (SOAP, Balanced R-D, CMD-LIC) and measure it.

The Python API (lictrain/api.py): lictrain.trainer, lictrain.evaluation, lictrain.build_model, lictrain.build_optimizer,
lictrain.load_config. They are imported on first use, so `import lictrain` stays light.
"""

__version__ = "0.1.0"

_API = ("train", "evaluate", "build_model", "build_optimizer", "load_config", "make_config")


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'lictrain' has no attribute '{name}'")


def __dir__():
    return sorted([*globals(), *_API])
