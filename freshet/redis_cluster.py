"""Redis Cluster topology: which primary owns a key (CRC16 slots), redirections, one hash tag per primary.

Owns the arithmetic the serving fast reader, the stream's row writer and its row markers
share; the clients themselves come from `freshet.endpoints.redis_client`.

>>> slots = SlotMap.from_cluster_slots([[0, 5460, [b"10.0.0.1", 7000, b"id1"]],
...                                     [5461, 10922, [b"10.0.0.2", 7000, b"id2"]],
...                                     [10923, 16383, [b"10.0.0.3", 7000, b"id3"]]])
>>> key_slot(b"foo"), slots.node_of(b"foo")
(12182, ('10.0.0.3', 7000))
>>> slots.group([b"foo", b"bar", b"baz"])
{('10.0.0.3', 7000): [0], ('10.0.0.1', 7000): [1, 2]}
>>> tags = slots.tags()
>>> [slots.node_of(("{%s}x" % tags[node]).encode()) == node for node in slots.primaries]
[True, True, True]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from redis.crc import key_slot

SLOTS = 16384

Node = tuple[str, int]  # (host, port) of a primary

__all__ = ["SLOTS", "Node", "SlotMap", "hash_tags", "key_slot", "redirection"]


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, (bytes, bytearray)) else str(v)


@dataclass(frozen=True)
class SlotMap:
    """The primary owning each of the 16384 slots (None where no node serves it)."""

    owners: tuple[Node | None, ...]

    @classmethod
    def from_cluster_slots(cls, reply: Sequence[Sequence[Any]], seed_host: str = "127.0.0.1") -> "SlotMap":
        """From a CLUSTER SLOTS reply: [start, end, [host, port, id, ...], replicas...] per range.

        An empty host (a node that does not know its own address) means the node answering,
        `seed_host`.
        """
        owners: list[Node | None] = [None] * SLOTS
        for entry in reply:
            start, end, primary = int(entry[0]), int(entry[1]), entry[2]
            host = _text(primary[0]) or seed_host
            node = (host, int(primary[1]))
            owners[start:end + 1] = [node] * (end - start + 1)
        return cls(tuple(owners))

    @property
    def primaries(self) -> list[Node]:
        """Every primary that owns a slot, in slot order."""
        return list(dict.fromkeys(n for n in self.owners if n is not None))

    @property
    def complete(self) -> bool:
        """True when every slot has an owner (a cluster that can answer for any key)."""
        return None not in self.owners

    def node_of(self, key: bytes) -> Node | None:
        return self.owners[key_slot(key)]

    def group(self, keys: Iterable[bytes]) -> dict[Node | None, list[int]]:
        """The positions of `keys` by the primary that owns each (first-seen order)."""
        out: dict[Node | None, list[int]] = {}
        owners = self.owners
        for i, key in enumerate(keys):
            node = owners[key_slot(key)]
            group = out.get(node)
            if group is None:
                out[node] = [i]
            else:
                group.append(i)
        return out

    def tags(self) -> dict[Node, str]:
        """A short hash tag per primary: a key containing "{tag}" lands on that primary.

        Keys kept once per primary (the stream's row markers) carry them, so that every
        primary holds one and a primary that loses its data is noticed by its own missing key.
        """
        return hash_tags(set(self.primaries), self.owners.__getitem__)


def hash_tags(primaries: set, owner: Callable[[int], Any]) -> dict[Any, str]:
    """A short hash tag for each of `primaries`, `owner(slot)` saying which primary owns a slot
    (None if none): the first of "n0", "n1", ... whose slot it owns."""
    out: dict[Any, str] = {}
    for i in range(1_000_000):
        if len(out) == len(primaries):
            break
        tag = f"n{i}"
        node = owner(key_slot(tag.encode()))
        if node in primaries and node not in out:
            out[node] = tag
    return out


def redirection(message: str, seed_host: str = "127.0.0.1") -> tuple[str, int, Node] | None:
    """("MOVED" or "ASK", slot, node) of a redirection error reply; None for any other error.

    >>> redirection("MOVED 3999 127.0.0.1:6381")
    ('MOVED', 3999, ('127.0.0.1', 6381))
    >>> redirection("ASK 3999 :6381", seed_host="10.0.0.9")
    ('ASK', 3999, ('10.0.0.9', 6381))
    >>> redirection("WRONGTYPE Operation against a key") is None
    True
    """
    parts = message.split()
    if len(parts) != 3 or parts[0] not in ("MOVED", "ASK"):
        return None
    host, _, port = parts[2].rpartition(":")
    return parts[0], int(parts[1]), (host or seed_host, int(port))
