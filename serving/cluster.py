"""The fast reader on a Redis Cluster: keys split by the primary owning their slot, one pipeline per primary.

Owns the slot map (CLUSTER SLOTS, read again after a MOVED), one RespConnection and one
AsyncRespClient per primary, and the redirections: MOVED (the slot moved for good: read
the map again, send there) and ASK (the slot is migrating: ASKING and the command, once, on
the node named).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Any, Sequence

import hiredis

from freshet.redis_cluster import Node, SlotMap, key_slot, redirection
from freshet.serving.resp import AsyncRespClient, RedisEndpoint, RedisUnavailable, RespConnection

MAX_REDIRECTS = 5  # rounds of MOVED/ASK one read follows before it gives up (a slot map in flux)
CLUSTER_SLOTS = hiredis.pack_command(("CLUSTER", "SLOTS"))
ASKING = hiredis.pack_command(("ASKING",))
PING = hiredis.pack_command(("PING",))


@dataclasses.dataclass
class _Round:
    """What one round sends to one primary: the commands' positions, and which are ASKed."""

    positions: list[int]
    blob: bytes
    replies: int
    asked: list[bool]


class ClusterReads:
    """Reads keys on a Redis Cluster: `execute(keys, commands)` returns each command's reply.

    Every command is about its key alone (HMGET), so commands are grouped by the primary that
    owns their key and each group leaves as one pipeline, every primary at once on the event
    loop (`execute_async`).
    """

    def __init__(self, seed: RedisEndpoint, timeout: float = 1.0, poll_s: float = 0.0):
        self.seed = dataclasses.replace(seed, db=0)
        self.timeout = timeout
        self.poll_s = poll_s
        self.slots: SlotMap | None = None
        self.refreshes = 0
        self.redirections = {"MOVED": 0, "ASK": 0}  # followed so far
        self._sync: dict[Node, RespConnection] = {}
        self._aio: dict[Node, AsyncRespClient] = {}
        self._lock = threading.Lock()

    def __str__(self) -> str:
        return f"Redis Cluster via {self.seed}"

    # -- connections ----------------------------------------------------------

    def _endpoint(self, node: Node) -> RedisEndpoint:
        return dataclasses.replace(self.seed, host=node[0], port=node[1])

    def sync_connection(self, node: Node) -> RespConnection:
        conn = self._sync.get(node)
        if conn is None:
            with self._lock:
                conn = self._sync.setdefault(node, RespConnection(self._endpoint(node), self.timeout, self.poll_s))
        return conn

    def async_client(self, node: Node) -> AsyncRespClient:
        client = self._aio.get(node)
        if client is None:
            client = self._aio[node] = AsyncRespClient(self._endpoint(node), self.timeout)
        return client

    def _known(self) -> list[Node]:
        """Where to ask for the slot map: the primaries known so far, then the seed."""
        nodes = self.slots.primaries if self.slots else []
        seed = (self.seed.host, self.seed.port)
        return [*nodes, seed] if seed not in nodes else nodes

    # -- the slot map -----------------------------------------------------------

    def _install(self, reply: Any, node: Node) -> SlotMap:
        if isinstance(reply, hiredis.ReplyError):
            raise RedisUnavailable(f"Redis at {node[0]}:{node[1]} refused CLUSTER SLOTS: {reply} "
                                   "(FRESHET_REDIS_CLUSTER=on needs a cluster node)")
        slots = SlotMap.from_cluster_slots(reply, node[0])
        if not slots.primaries:
            raise RedisUnavailable(f"Redis Cluster at {node[0]}:{node[1]} has no slots assigned yet")
        self.slots = slots
        self.refreshes += 1
        return slots

    def refresh(self) -> SlotMap:
        """Read the slot map from the first known node that answers."""
        errors = []
        for node in self._known():
            try:
                return self._install(self.sync_connection(node).execute(CLUSTER_SLOTS, 1)[0], node)
            except RedisUnavailable as exc:
                errors.append(str(exc))
        raise RedisUnavailable("no Redis Cluster node answered CLUSTER SLOTS: " + "; ".join(errors))

    async def refresh_async(self) -> SlotMap:
        errors = []
        for node in self._known():
            try:
                replies = await asyncio.wait_for(self.async_client(node).execute(CLUSTER_SLOTS, 1), self.timeout)
                return self._install(replies[0], node)
            except (RedisUnavailable, asyncio.TimeoutError) as exc:
                errors.append(str(exc) or f"{node[0]}:{node[1]} timed out")
        raise RedisUnavailable("no Redis Cluster node answered CLUSTER SLOTS: " + "; ".join(errors))

    # -- reads --------------------------------------------------------------------

    def _rounds(self, slots: SlotMap, todo: list[int], keys: Sequence[bytes], commands: Sequence[bytes],
                asked: dict[int, Node]) -> dict[Node, _Round]:
        """This round's commands by the node each goes to: its slot's owner, or where ASK sent it."""
        owners = slots.owners
        by_node: dict[Node, list[int]] = {}
        for i in todo:
            node = asked.get(i) or owners[key_slot(keys[i])]
            if node is None:
                raise RedisUnavailable(f"no primary serves slot {key_slot(keys[i])} of the Redis Cluster "
                                       f"via {self.seed} (CLUSTERDOWN?)")
            by_node.setdefault(node, []).append(i)
        out = {}
        for node, positions in by_node.items():
            flags = [i in asked for i in positions]
            parts = []
            for i, ask in zip(positions, flags):
                if ask:
                    parts.append(ASKING)
                parts.append(commands[i])
            out[node] = _Round(positions, b"".join(parts), len(positions) + sum(flags), flags)
        return out

    def _settle(self, rnd: _Round, got: list, replies: list) -> None:
        k = 0
        for i, ask in zip(rnd.positions, rnd.asked):
            k += ask  # ASKING's own +OK
            replies[i] = got[k]
            k += 1

    def _redirected(self, todo: list[int], replies: list, asked: dict[int, Node]) -> tuple[list[int], bool]:
        """The commands to send again and whether a MOVED asks for a new slot map."""
        again, moved = [], False
        asked.clear()
        for i in todo:
            reply = replies[i]
            if not isinstance(reply, hiredis.ReplyError):
                continue
            where = redirection(str(reply), self.seed.host)
            if where is None:
                continue  # another error: the caller reports it
            kind, _, node = where
            self.redirections[kind] += 1
            if kind == "ASK":
                asked[i] = node
            else:
                moved = True
            again.append(i)
        return again, moved

    def execute(self, keys: Sequence[bytes], commands: Sequence[bytes]) -> list:
        """Each command's reply (blocking); error replies other than redirections are returned as such."""
        replies: list = [None] * len(commands)
        todo, asked = list(range(len(commands))), {}
        for _ in range(MAX_REDIRECTS):
            # (another thread may have dropped the map meanwhile: the map is read again then)
            rounds = self._rounds(self.slots or self.refresh(), todo, keys, commands, asked)
            try:  # every primary's pipeline sent first, then their replies read: they work at once
                for node, rnd in rounds.items():
                    self.sync_connection(node).send(rnd.blob)
                for node, rnd in rounds.items():
                    self._settle(rnd, self.sync_connection(node).receive(rnd.replies), replies)
            except RedisUnavailable:
                self.slots = None  # a primary gone (failed over?): the next read asks for the map again
                for node in rounds:  # replies left unread would answer the next request
                    self.sync_connection(node).close()
                raise
            todo, moved = self._redirected(todo, replies, asked)
            if not todo:
                return replies
            if moved:
                self.refresh()
        raise RedisUnavailable(f"{self} still redirects {len(todo)} keys after {MAX_REDIRECTS} tries")

    async def execute_async(self, keys: Sequence[bytes], commands: Sequence[bytes]) -> list:
        """`execute` on the running event loop, every primary's pipeline in flight at once."""
        replies: list = [None] * len(commands)
        todo, asked = list(range(len(commands))), {}
        for _ in range(MAX_REDIRECTS):
            # (a request failing meanwhile may have dropped the map: it is read again then)
            rounds = self._rounds(self.slots or await self.refresh_async(), todo, keys, commands, asked)
            # every primary's request queued before any reply is awaited; no task per primary
            sent = [self.async_client(node).submit(rnd.blob, rnd.replies) for node, rnd in rounds.items()]
            got, failed = [], None
            for pending in sent:
                try:
                    got.append(await pending)
                except Exception as exc:  # noqa: BLE001 - every reply awaited, the first failure raised
                    failed = failed or exc
                    got.append(None)
            if failed is not None:
                self.slots = None  # a primary gone (failed over?): the next read asks for the map again
                raise failed
            for rnd, g in zip(rounds.values(), got):
                self._settle(rnd, g, replies)
            todo, moved = self._redirected(todo, replies, asked)
            if not todo:
                return replies
            if moved:
                await self.refresh_async()
        raise RedisUnavailable(f"{self} still redirects {len(todo)} keys after {MAX_REDIRECTS} tries")

    # -- health ---------------------------------------------------------------------

    async def ping(self) -> None:
        """PING every primary (the map read first if needed); RedisUnavailable naming the first that fails."""
        slots = self.slots or await self.refresh_async()
        if not slots.complete:
            raise RedisUnavailable(f"{self}: {slots.owners.count(None)} slots have no primary")
        got = await asyncio.gather(*(self.async_client(node).ping() for node in slots.primaries),
                                   return_exceptions=True)
        for node, g in zip(slots.primaries, got):
            if isinstance(g, BaseException):
                self.slots = None
                raise RedisUnavailable(f"primary {node[0]}:{node[1]}: {g or type(g).__name__}")

    async def close(self) -> None:
        for client in list(self._aio.values()):
            await client.close()
        self._aio.clear()

    def close_sync(self) -> None:
        for conn in list(self._sync.values()):
            conn.close()
