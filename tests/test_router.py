"""The deployment topology on loopback, no Docker: nginx with the project's own
deploy/nginx.conf (rendered for loopback ports) in front of two real q8kv-server processes.

Sessions are created through the router with client-made ids; each replica's own
ListSessions then shows where they went. Every call of a session must reach the same
replica (a call that reached the other one would have failed with NOT_FOUND, and the
router's access log names the upstream of every call), both replicas must hold sessions,
and the outputs must match a float64 attention over the replica's own Dequantize.
"""

from __future__ import annotations

import re
import uuid
from collections import defaultdict

import grpc
import numpy as np
import pytest
import routing
from harness.server import free_port
from harness.tensors import qkv
from reference import attention_ref
from routing import GEO, check_step

from q8kv import wire
from q8kv.client import Client, Q8KVError
from q8kv.v1 import kvcache_pb2 as pb
from q8kv.v1 import kvcache_pb2_grpc

pytestmark = pytest.mark.skipif(routing.NGINX is None, reason="nginx is not installed")

SESSIONS = 50
PREFILL = 5


@pytest.fixture
def topology(start_server, tmp_path):
    replicas = [start_server("--memory-budget", "64MiB") for _ in range(2)]
    router = routing.Router(tmp_path / "nginx", free_port(), [r.address for r in replicas])
    yield router, replicas
    router.stop()


def test_router_affinity_outputs_and_replica_death(topology):
    router, replicas = topology
    rng = np.random.default_rng(7)

    with Client(router.address, timeout=10) as client:
        sessions = [client.create_session(**GEO) for _ in range(SESSIONS)]
        sent: dict[tuple[str, int], list[np.ndarray]] = defaultdict(list)
        # Prefill both layers, then two decode steps, interleaving sessions.
        for n in (PREFILL, 1, 1):
            for s in sessions:
                for layer in range(GEO.num_layers):
                    check_step(s, layer, *qkv(rng, n, GEO), sent[s.id, layer])

        # Where each session lives, from the replicas' own session lists.
        held = []
        for r in replicas:
            with Client(r.address, timeout=10) as direct:
                held.append({info.id: info for info in direct.list_sessions()})
        ids = {s.id for s in sessions}
        assert not held[0].keys() & held[1].keys(), "a session exists on both replicas"
        assert held[0].keys() | held[1].keys() == ids
        assert held[0] and held[1], f"one replica got every session: {[len(x) for x in held]}"
        # Every append of every session landed on its replica: the lengths add up there.
        for owner in held:
            for info in owner.values():
                assert info.layer_lengths == [PREFILL + 2] * GEO.num_layers

        # The router's own record: one upstream per session id, the replica that holds it.
        upstreams: dict[str, set[str]] = defaultdict(set)
        for line in router.access_log():
            m = re.search(r"sid=(\S+) upstream=(\S+)", line)
            if m and m.group(1) != "-":
                upstreams[m.group(1)].add(m.group(2))
        assert upstreams.keys() == ids
        for sid, addrs in upstreams.items():
            owner = replicas[0] if sid in held[0] else replicas[1]
            assert addrs == {owner.address}, (sid, addrs)

        # One replica dies. Its sessions get a clear error naming them; the others go on.
        dead, alive = replicas[0], replicas[1]
        assert dead.stop() is not None
        lost = [s for s in sessions if s.id in held[0]]
        kept = [s for s in sessions if s.id in held[1]]
        for s in lost:
            with pytest.raises(Q8KVError) as err:
                s.append_and_attend(0, *qkv(rng, 1, GEO))
            # The router skips the dead replica; the survivor does not know the id.
            assert err.value.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)
            if err.value.code == grpc.StatusCode.NOT_FOUND:
                assert s.id in err.value.message
        for s in kept:
            check_step(s, 0, *qkv(rng, 1, GEO), sent[s.id, 0])

        # The client's recovery path: re-create the lost session under its id, re-prefill.
        again = client.create_session(**GEO, session_id=lost[0].id)
        check_step(again, 0, *qkv(rng, PREFILL, GEO), [])
        with Client(alive.address, timeout=10) as direct:
            assert lost[0].id in {info.id for info in direct.list_sessions()}


GROUP = 6  # sessions per packed call


def _batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    """q [GROUP, n, H, D], k and v [GROUP, n, KVH, D]: random, never zeros."""
    parts = [qkv(rng, n, GEO) for _ in range(GROUP)]
    return tuple(np.stack(x) for x in zip(*parts, strict=True))


def _check_batch(client, direct, sessions, key: str, n: int, rng) -> None:
    """One attend_batch of ``sessions`` through the router under their routing ``key``,
    checked per session against float64 attention over the owning replica's own cache."""
    q, k, v = _batch(rng, n)
    reply = client.attend_batch(0, sessions, q, k, v, with_lengths=True, routing_key=key)
    assert reply.output.shape == q.shape
    for b, session in enumerate(sessions):
        cache = direct.Dequantize(pb.DequantizeRequest(session_id=session.id, layer=0), timeout=10)
        length = cache.length
        assert reply.lengths[b] == length
        expected = attention_ref(
            q[b], wire.decode(cache.k), wire.decode(cache.v), length - n, 1 / np.sqrt(GEO.head_dim)
        )
        np.testing.assert_allclose(reply.output[b], expected, rtol=1e-4, atol=1e-5)


def test_packed_batch_through_router_needs_one_routing_key(topology):
    """Sessions created through the router with the client's routing_key (one shared key)
    all land on one replica, whatever their own ids hash to; attend_batch with that key
    reaches that replica and attends correctly, and each handle's own calls (and a handle
    made by id with the key) reach it too; the same batch under a key of the other
    replica answers NOT_FOUND there and appends nothing."""
    router, replicas = topology
    rng = np.random.default_rng(11)
    channels = [grpc.insecure_channel(r.address) for r in replicas]
    client = Client(router.address, timeout=30)
    try:
        direct = [kvcache_pb2_grpc.KVCacheServiceStub(c) for c in channels]
        groups: dict[int, tuple[str, list]] = {}  # replica index -> (key, handles) there
        for attempt in range(64):  # until a group sits on each replica (1 in 2**63 fails)
            key = f"grp{attempt}-{uuid.uuid4().hex[:8]}"
            group = [
                client.create_session(**GEO, session_id=f"{key}-{i}", routing_key=key)
                for i in range(GROUP)
            ]
            owners = {routing.holder(direct, s.id) for s in group}
            assert len(owners) == 1, f"group {key} split over replicas {owners}"
            groups.setdefault(owners.pop(), (key, group))
            if len(groups) == len(replicas):
                break
        assert groups.keys() == {0, 1}

        for index, (key, group) in groups.items():
            _check_batch(client, direct[index], group, key, 3, rng)  # a prefill of 3 each
            _check_batch(client, direct[index], group, key, 1, rng)  # one decode step
            for session in group:  # every per-session call of a handle reaches its replica
                assert session.info().layer_lengths == [4, 0]
                assert session.dequantize(0)[0].shape[1] == 4
            again = client.session(group[0].id, routing_key=key)
            assert again.length(0) == 4 and again.truncate(4).layer_lengths == [4, 0]

        # Routed by the other group's key: the other replica holds none of these sessions.
        (key, group), (other, _) = groups[0], groups[1]
        with pytest.raises(Q8KVError) as err:
            client.attend_batch(0, group, *_batch(rng, 1), routing_key=other)
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        assert group[0].id in err.value.message
        for session in group:
            assert session.info().layer_lengths == [4, 0]
            assert session.delete() > 0
    finally:
        client.close()
        for c in channels:
            c.close()
