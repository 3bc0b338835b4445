"""The built-in recipes: named sets of config overrides (`lictrain train --recipe NAME`, `compare.recipes`).

Nothing else differs between recipes: the same lr, schedule, clipping, EMA. Users add their own under
`compare.recipe_sets` in a config, or with `register_recipe` in Python.
"""

from __future__ import annotations

import json

from .registry import RECIPES, register_recipe

register_recipe("adam", {"optim.name": "adam"})
register_recipe("adamw", {"optim.name": "adamw"})
register_recipe("soap", {"optim.name": "soap"})
register_recipe("shampoo", {"optim.name": "shampoo"})
register_recipe("muon", {"optim.name": "muon"})
register_recipe("sgd", {"optim.name": "sgd"})
# Balanced R-D Solution 1 (from scratch). The authors train it with a cautious Adam: the three recipes separate the
# balancing (balanced-rd), the optimizer (cautious-adam) and their pairing as the authors run it (balanced-rd-cautious)
register_recipe("balanced-rd", {"optim.name": "adam", "method.name": "balanced-rd"})
register_recipe("cautious-adam", {"optim.name": "cautious-adam"})
register_recipe("balanced-rd-cautious", {"optim.name": "cautious-adam", "method.name": "balanced-rd"})
# Solution 2 is for fine-tuning: give the compare a train.init_from checkpoint (all its recipes start there)
register_recipe("balanced-rd-qp", {"optim.name": "adam", "method.name": "balanced-rd-qp"})
register_recipe("soap+balanced-rd", {"optim.name": "soap", "method.name": "balanced-rd"})
# CMD-LIC: STDET + SMA (alpha 0.8, l = 5) with the paper's from-scratch proportions tied to the run's train.steps
# (lictrain/methods/cmd.py). Its time saving comes from a shorter budget, 70/120 of the baseline's steps: a
# compare sets that per recipe (configs/bench-cmd.yaml)
register_recipe("cmd-lic", {"optim.name": "adam+sma", "method.name": "cmd-lic"})
register_recipe("adam+sma", {"optim.name": "adam+sma"})
register_recipe("soap+sma", {"optim.name": "soap+sma"})


def recipe_overrides(name: str) -> list[str]:
    """A built-in recipe as `key=value` overrides (for `lictrain train --recipe`)."""
    overrides = RECIPES.lookup(name)
    return [f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in overrides.items()]
