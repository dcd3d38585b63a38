"""Timing of the consensus core, counted in ticks of the caller's clock."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ConsensusConfig:
    """Defaults assume one tick every `tick_ms` (50 ms): the caller calls `tick()` that often.

    Failover: followers notice a silent master after 10-20 ticks (0.5-1.0 s, randomized),
    then a pre-vote and a vote round trip and the new master's first entry commit (a few
    LAN round trips): a new master accepts commands about 0.6-1.1 s after the old one died.
    """

    tick_ms: int = 50
    # The master sends a heartbeat (an append, empty when the follower is caught up).
    heartbeat_ticks: int = 2  # 100 ms
    # A follower that hears no master for a random [election_ticks, 2*election_ticks)
    # ticks starts an election; a master that hears from no quorum for election_ticks
    # steps down (check-quorum), so a partitioned master does not keep taking commands.
    election_ticks: int = 10  # 500 ms .. 1 s
    # A voter silent this long is removed from the voters (MemberTimedOut).
    member_timeout_ticks: int = 100  # 5 s
    # Producers re-send local events and commands not yet answered this often.
    resend_ticks: int = 10  # 500 ms
    # A command not answered within this bound (e.g. no master elected) is rejected.
    command_timeout_ticks: int = 200  # 10 s
    # A node outside the voters (new, or removed) asks to join this often.
    join_retry_ticks: int = 10  # 500 ms
    # At most this many entries in one append message (and commands in one forward).
    max_append_entries: int = 256
    # ... and at most this many bytes of them (JSON), though always at least one; also the
    # size of a snapshot's chunks. The mesh refuses frames over 64 MiB, and a task's
    # messages may be up to the API's 4 MiB (8 MiB at most).
    max_message_bytes: int = 16 * 1024 * 1024
    # A snapshot of the applied state every this many applied entries; the log keeps
    # the entries since the previous snapshot, so a follower a little behind gets entries.
    snapshot_every: int = 1000

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_ticks < self.election_ticks:
            raise ValueError("need 0 < heartbeat_ticks < election_ticks")
        if self.member_timeout_ticks <= 2 * self.election_ticks:
            raise ValueError("member_timeout_ticks must exceed two election timeouts")
        if min(self.resend_ticks, self.command_timeout_ticks, self.join_retry_ticks) <= 0:
            raise ValueError("resend, command timeout and join retry must be positive")
        if min(self.max_append_entries, self.snapshot_every, self.max_message_bytes) <= 0:
            raise ValueError("max_append_entries, snapshot_every, max_message_bytes must be > 0")
