"""How a node's CPU cores are divided between the CPU stages of one instance it runs.

Each stage gets whole physical cores of its own (hyperthreads of a core stay together), so
no stage's threads wait on a core another stage holds; `supervisor.runner_env` hands the
set to the runner, which applies it before it starts a thread. A torch stage gets thread
counts instead (`physical_count` of its share and of all the cores): it runs on all of them
and takes all when no other stage has work, its share otherwise.
"""

import os
from collections.abc import Iterable, Mapping
from pathlib import Path


def cpu_cores() -> dict[int, tuple[int, int]]:
    """The CPUs this process may run on, each with its physical core (package, core id);
    every CPU its own core where the topology is not readable. Empty off Linux."""
    if not hasattr(os, "sched_getaffinity"):
        return {}
    cores: dict[int, tuple[int, int]] = {}
    for cpu in sorted(os.sched_getaffinity(0)):
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = int((topology / "physical_package_id").read_text())
            core = int((topology / "core_id").read_text())
        except (OSError, ValueError):
            package, core = -1, cpu
        cores[cpu] = (package, core)
    return cores


def cpu_share(cores: Mapping[int, tuple[int, int]], slot: int, slots: int) -> set[int] | None:
    """Slot `slot`'s CPUs when `slots` stages divide these CPUs between them: whole
    physical cores (hyperthreads stay together), as even a split as the cores allow. None
    when there are fewer cores than slots."""
    groups: dict[tuple[int, int], set[int]] = {}
    for cpu in sorted(cores):
        groups.setdefault(cores[cpu], set()).add(cpu)
    ordered = list(groups.values())
    if not 0 <= slot < slots or len(ordered) < slots:
        return None
    mine = ordered[slot * len(ordered) // slots : (slot + 1) * len(ordered) // slots]
    return {cpu for group in mine for cpu in group}


def physical_count(cores: Mapping[int, tuple[int, int]], cpus: Iterable[int]) -> int:
    """How many physical cores these CPUs are (a thread per core: hyperthreads share one's
    load ports)."""
    return len({cores[cpu] for cpu in cpus if cpu in cores})
