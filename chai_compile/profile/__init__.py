"""Profile: calibration text -> attention similarity -> clusters -> a mapping (the similarity-based plan).

- `calibration`: token windows from text; `capture`: attention features per head; `clustering`: clusters
  and representatives; `measure`: `profile_model` and the budget mappings; `options`: settings and their
  checks (no heavy imports); `report`: predicted savings and plots; `cli`, `inspect_cli`: the commands.
- Long context (`profile-long`): `long_context` runs the windows, `spans` (mass within sinks + a recent window
  per head) and `layer_similarity` (1 - TV between layers) accumulate the statistics; `long_cli`: the command.
"""

from __future__ import annotations

import importlib
from typing import Any

# Resolved on first use (PEP 562): `chai_compile.profile.options` and `.cli` must not import torch for --help.
_LAZY = {name: "measure" for name in ("ProfileData", "budget_options", "derive_mapping", "load_profile_data",
                                      "measure", "profile_model")}
_LAZY.update({name: "options" for name in ("FEATURES", "ProfileOptions", "check_options", "check_static",
                                           "max_positions")})


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"chai_compile.profile.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'chai_compile.profile' has no attribute {name!r}")
