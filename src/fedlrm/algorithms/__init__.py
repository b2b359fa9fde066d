"""Federated algorithms, one module each, all behind `fedlrm.algorithms.base.Algorithm`."""

from fedlrm.algorithms.apfl import APFL
from fedlrm.algorithms.f3ocus import F3OCUS
from fedlrm.algorithms.base import Algorithm, State, Upload, weighted_mean
from fedlrm.algorithms.fedavg import FedAvg
from fedlrm.algorithms.fedlease import FedLEASE
from fedlrm.algorithms.fedlrm import FedLRM
from fedlrm.algorithms.fedpia import FedPIA
from fedlrm.algorithms.fedprox import FedProx
from fedlrm.algorithms.local import Local
from fedlrm.algorithms.zeroshot import ZeroShot

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (ZeroShot, Local, FedAvg, FedProx, APFL, FedLRM, FedLEASE, FedPIA, F3OCUS)
}


def get_algorithm(cfg) -> Algorithm:
    return ALGORITHMS[cfg.algorithm](cfg)


__all__ = ["ALGORITHMS", "Algorithm", "State", "Upload", "get_algorithm", "weighted_mean"]
