"""One file per algorithm, registered by the name used in ``algo:``."""

from advantageflow.algorithms.base import Algorithm, AlgorithmBase, SamplerRequest, TrainContext
from advantageflow.registry import Registry

ALGORITHMS: Registry = Registry("algorithm")
ALGORITHMS.register("advantageflow", "advantageflow.algorithms.advantageflow:AdvantageFlow")
ALGORITHMS.register("awm", "advantageflow.algorithms.awm:AWM")
ALGORITHMS.register("flow_grpo", "advantageflow.algorithms.flow_grpo:FlowGRPO")
ALGORITHMS.register("diffusion_nft", "advantageflow.algorithms.diffusion_nft:DiffusionNFT")
ALGORITHMS.register("epg", "advantageflow.algorithms.epg:EPG")
ALGORITHMS.register("ram", "advantageflow.algorithms.ram:RAM")
ALGORITHMS.register("draft", "advantageflow.algorithms.draft:DRaFT")

__all__ = ["ALGORITHMS", "Algorithm", "AlgorithmBase", "SamplerRequest", "TrainContext"]
