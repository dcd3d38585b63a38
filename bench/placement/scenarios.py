"""Heterogeneous clusters built from the spec table, and the model each is asked to serve."""

import random

from bench.placement.specs import DEVICES, MODELS, device, mesh

from exo.shared.types.base import Frozen
from exo.shared.types.models import ModelCard
from exo.shared.types.topology import ClusterView, DeviceProfile


class Scenario(Frozen):
    name: str
    # Mixed device generations: the set the >= 1.5x geometric-mean target is about.
    mixed: bool
    model: ModelCard
    cluster: ClusterView


def _cluster(nodes: dict[str, list[str]], link: str) -> ClusterView:
    devices: list[DeviceProfile] = []
    for node, names in nodes.items():
        devices += [device(node, i, name) for i, name in enumerate(names)]
    return ClusterView(devices=tuple(devices), links=mesh(list(nodes), link))


HOMELAB = {
    "rig": ["RTX4090", "Ryzen7950X"],
    "old": ["RTX3090"],
    "srv": ["T4", "T4"],
    "mini": ["M4Pro"],
}


def scenarios() -> list[Scenario]:
    def s(name: str, mixed: bool, model: str, nodes: dict[str, list[str]], link: str) -> Scenario:
        return Scenario(name=name, mixed=mixed, model=MODELS[model], cluster=_cluster(nodes, link))

    return [
        s("homelab 70B q4, 1GbE", True, "llama-70b-q4", HOMELAB, "1GbE"),
        s("homelab 32B q4, 1GbE", True, "qwen-32b-q4", HOMELAB, "1GbE"),
        s(
            "M2 Ultra + 4090 box, 10GbE, 70B q4",
            True,
            "llama-70b-q4",
            {"studio": ["M2Ultra"], "rig": ["RTX4090", "Ryzen7950X"]},
            "10GbE",
        ),
        s(
            "M2 Ultra + 2x M4 Pro, TB4, 70B q4",
            True,
            "llama-70b-q4",
            {"studio": ["M2Ultra"], "m1": ["M4Pro"], "m2": ["M4Pro"]},
            "TB4",
        ),
        s(
            "workstation + mini, 10GbE, 8B bf16",
            True,
            "llama-8b-bf16",
            {"ws": ["RTX3090", "T4", "Ryzen7950X"], "mini": ["M4Pro"]},
            "10GbE",
        ),
        s(
            "edge: 2x M4 Pro + CPU + T4, 1GbE, 70B q4",
            True,
            "llama-70b-q4",
            {"m1": ["M4Pro"], "m2": ["M4Pro"], "cpu": ["Ryzen7950X"], "t4": ["T4"]},
            "1GbE",
        ),
        s(
            "cloud: 2x H100 + 4x A10 + 4x T4, 10GbE, 70B bf16",
            True,
            "llama-70b-bf16",
            {"h": ["H100"] * 2, "a": ["A10"] * 4, "t": ["T4"] * 4},
            "10GbE",
        ),
        s(
            "dc: 2x H100 + 4x A100 + 4x L40S, 100GbE, 70B bf16",
            True,
            "llama-70b-bf16",
            {"h": ["H100"] * 2, "a": ["A100-80"] * 4, "l": ["L40S"] * 4},
            "100GbE",
        ),
        s(
            "EPYC + A100-40 + 3090, 10GbE, 70B bf16",
            True,
            "llama-70b-bf16",
            {"epyc": ["EPYC9654", "A100-40"], "g": ["RTX3090", "RTX3090"]},
            "10GbE",
        ),
        s(
            "same gen: 4x RTX 3090 one box, 70B q4",
            False,
            "llama-70b-q4",
            {"box": ["RTX3090"] * 4},
            "10GbE",
        ),
        s(
            "same gen: 2x A100-80, 10GbE, 70B bf16",
            False,
            "llama-70b-bf16",
            {"a": ["A100-80"], "b": ["A100-80"]},
            "10GbE",
        ),
    ]


def random_scale(n_devices: int, seed: int, model: str) -> Scenario:
    """n_devices GPUs/CPUs of mixed generations on nodes of 1-8 devices (solve-time runs)."""
    rng = random.Random(seed)
    names = list(DEVICES)
    nodes: dict[str, list[str]] = {}
    left = n_devices
    while left:
        size = min(left, rng.choice([1, 2, 4, 8]))
        # Servers hold one kind of card; desktops mix a GPU with their CPU.
        nodes[f"n{len(nodes)}"] = [rng.choice(names)] * size
        left -= size
    link = rng.choice(["10GbE", "100GbE"])
    return Scenario(
        name=f"random {n_devices} devices seed {seed}",
        mixed=True,
        model=MODELS[model],
        cluster=_cluster(nodes, link),
    )
