"""Federated algorithms, one module each, all behind the contract of `fedlrm.algorithms.base`.

Importing this package imports every module in it, and each registers its algorithm with
`@register`; the paper's methods come first, in the order `fedlrm compare` shows them.
Runtimes and tools import from here, never from a method's own module.
"""

import importlib
import pkgutil

from fedlrm.algorithms.base import (Algorithm, ClientRound, NoSettings, Schema, ServerState, State, Upload,
                                    weighted_mean)
from fedlrm.algorithms.registry import (ALGORITHMS, check, compare_entries, config_from_dict, get_algorithm,
                                        load_config, register, unregister)

_CONTRACT = {"base", "registry"}
_PAPER_ORDER = ("zeroshot", "local", "fedavg", "fedprox", "apfl", "fedlrm", "fedlease", "fedpia", "f3ocus", "promptfl", "fedotp", "pfedmoap")


def _discover() -> None:
    found = [m.name for m in pkgutil.iter_modules(__path__) if m.name not in _CONTRACT]
    order = {name: i for i, name in enumerate(_PAPER_ORDER)}
    for module in sorted(found, key=lambda m: (order.get(m, len(order)), m)):
        importlib.import_module(f"{__name__}.{module}")


_discover()

__all__ = ["ALGORITHMS", "Algorithm", "ClientRound", "NoSettings", "Schema", "ServerState", "State", "Upload",
           "check", "compare_entries", "config_from_dict", "get_algorithm", "load_config", "register", "unregister", "weighted_mean"]
