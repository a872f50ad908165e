"""ForkSession end to end, on a real server on loopback, through both clients: branches
that diverge compute what sessions fed the same tokens from scratch compute; the pool
counts a shared page once (q8kv_pool_used_bytes, q8kv_pool_shared_saved_bytes) and is
empty once every session is deleted; bad forks fail with a clear error and change
nothing; a tenant can neither fork nor see another tenant's session, nor get past its
limits by forking."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from harness.geometry import Geo, page_bytes
from harness.scrape import metric
from harness.sessions import caches
from harness.tensors import qkv

from q8kv.client import AsyncClient, Client, Q8KVError

GEO = Geo(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, max_len=512)
PCB = 4096  # 16 tokens per page for GEO
T = 16
PAGE = page_bytes(PCB)
TOKEN_A = "alpha-fork-token-0123"
TOKEN_B = "bravo-fork-token-4567"


class Tree:
    """Sessions and their forks, each with its history of appends (a fork's inherited
    from its source, cut at the fork's length), replayed from scratch by ``check``."""

    def __init__(self, client: Client, rng: np.random.Generator) -> None:
        self.c, self.rng, self.calls = client, rng, {}

    def root(self, n: int, **kwargs):
        s = self.c.create_session(**GEO, **kwargs)
        self.calls[s] = []
        self.append(s, n)
        return s

    def append(self, s, n: int) -> None:
        for layer in range(GEO.num_layers):
            t = qkv(self.rng, n, GEO)
            self.calls[s].append((layer, t, s.append_and_attend(layer, *t)))

    def fork(self, s, length: int | None = None, **kwargs):
        f = s.fork(length=length, **kwargs)
        left = dict.fromkeys(range(GEO.num_layers), 2**31 if length is None else length)
        inherited = []
        for layer, t, _ in self.calls[s]:
            n = min(left[layer], t[0].shape[0])
            left[layer] -= n
            if n:
                inherited.append((layer, tuple(x[:n] for x in t), None))
        self.calls[f] = inherited
        return f

    def check(self, s) -> None:
        """Outputs ``s`` computed itself and its whole cache equal a replay from scratch."""
        twin = self.c.create_session(**GEO)
        for layer, t, out in self.calls[s]:
            replayed = twin.append_and_attend(layer, *t)
            if out is not None:
                np.testing.assert_array_equal(out, replayed)
        assert caches(s, GEO.num_layers) == caches(twin, GEO.num_layers)
        twin.delete()


def test_branches_equal_sessions_built_from_scratch_and_the_pool_counts_once(start_server):
    """Two forks (one cut shorter, into the shared region) and a fork of a fork diverge
    from the source, which appends too and is then deleted: each branch's outputs and
    cache equal a from-scratch session's; a shared page is counted once; all deleted, the
    pool is empty."""
    srv = start_server("--page-bytes", str(PCB))
    used = lambda: metric(srv.metrics_url, "q8kv_pool_used_bytes")  # noqa: E731
    saved = lambda: metric(srv.metrics_url, "q8kv_pool_shared_saved_bytes")  # noqa: E731
    with Client(srv.address, timeout=30) as c:
        tree = Tree(c, np.random.default_rng(16))
        src = tree.root(37, routing_key="tree-1")  # 3 pages per layer, the last partial
        a = tree.fork(src, session_id="branch-a")
        b = tree.fork(src, length=30, ttl_seconds=60)
        assert (a.id, a.routing_key, b.routing_key) == ("branch-a", "tree-1", "tree-1")
        info = b.info()
        assert info.layer_lengths == [30, 30] and info.ttl_seconds == 60
        assert a.info().reserved_bytes == 6 * PAGE  # each session names its pages in full
        assert used() == 6 * PAGE and saved() == 10 * PAGE  # ... the pool counts them once
        tree.append(a, 1)  # copies the shared partial page: +1 page per layer
        assert used() == 8 * PAGE and saved() == 8 * PAGE
        tree.append(b, 5)
        tree.append(src, 2)
        a2 = tree.fork(a, length=38)  # a fork of a fork, into a's own page
        for _ in range(3):
            for branch in (a, b, src, a2):
                tree.append(branch, 1)
        freed = src.delete()  # its forks live on: only the source's own pages go back
        assert 0 < freed < 6 * PAGE
        del tree.calls[src]
        for branch in tree.calls:
            tree.check(branch)
            branch.delete()
        assert used() == 0 and saved() == 0


def test_concurrent_appends_to_branches(start_server):
    """Eight forks of one session append at once (the async client; the server batches
    them, copies the shared page for each): each equals its from-scratch replay."""
    srv = start_server("--page-bytes", str(PCB), "--max-queue-delay-us", "2000")
    rng = np.random.default_rng(7)

    async def body() -> dict:
        async with AsyncClient(srv.address, timeout=30) as c:
            src = await c.create_session(**GEO)
            prefix = [qkv(rng, 21, GEO) for _ in range(GEO.num_layers)]
            for layer, t in enumerate(prefix):
                await src.append_and_attend(layer, *t)
            forks = await asyncio.gather(*(src.fork() for _ in range(8)))
            steps = [
                [[qkv(rng, 1, GEO) for _ in range(GEO.num_layers)] for _ in forks] for _ in range(3)
            ]

            async def run(f, tokens):
                return [await f.append_and_attend(layer, *t) for layer, t in enumerate(tokens)]

            outs = [
                await asyncio.gather(*(run(f, step[i]) for i, f in enumerate(forks)))
                for step in steps
            ]
            return {"prefix": prefix, "steps": steps, "outs": outs, "ids": [f.id for f in forks]}

    got = asyncio.run(body())
    with Client(srv.address, timeout=30) as c:
        for i, fid in enumerate(got["ids"]):
            twin = c.create_session(**GEO)
            for layer, t in enumerate(got["prefix"]):
                twin.append_and_attend(layer, *t)
            for step, outs in zip(got["steps"], got["outs"], strict=True):
                for layer, t in enumerate(step[i]):
                    np.testing.assert_array_equal(outs[i][layer], twin.append_and_attend(layer, *t))
            assert caches(c.session(fid), GEO.num_layers) == caches(twin, GEO.num_layers)


def test_bad_forks_fail_clearly_and_change_nothing(start_server):
    """length past the source's shortest layer: INVALID_ARGUMENT naming the field, the
    bound and the value; an unknown source: NOT_FOUND; an id in use: ALREADY_EXISTS; a
    bad id: INVALID_ARGUMENT; none creates a session."""
    srv = start_server("--page-bytes", str(PCB))
    with Client(srv.address, timeout=30) as c:
        tree = Tree(c, np.random.default_rng(3))
        src = tree.root(37)
        shown = lambda: [(i.id, i.layer_lengths) for i in c.list_sessions()]  # noqa: E731
        before = shown()
        cases = [
            (
                dict(length=38),
                grpc.StatusCode.INVALID_ARGUMENT,
                f"length: expected 0..37 (the shortest layer of session '{src.id}'), got 38",
            ),
            (dict(length=-1), grpc.StatusCode.INVALID_ARGUMENT, "got -1"),
            (dict(session_id=src.id), grpc.StatusCode.ALREADY_EXISTS, "already exists"),
            (dict(session_id="bad id!"), grpc.StatusCode.INVALID_ARGUMENT, "session_id"),
        ]
        for kwargs, code, text in cases:
            with pytest.raises(Q8KVError) as err:
                src.fork(**kwargs)
            assert err.value.code == code and text in err.value.message, err.value
        with pytest.raises(Q8KVError) as err:
            c.fork_session("no-such-session")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        assert shown() == before


def test_a_fork_needs_no_memory_and_a_copy_that_cannot_get_a_page_fails_cleanly(
    start_server,
):
    """A full pool: the fork still works (it takes no page); the first append into the
    shared partial page is RESOURCE_EXHAUSTED and appends nothing, on either side; once the
    source is deleted the fork holds its pages alone and appends in place."""
    srv = start_server("--page-bytes", str(PCB), "--memory-budget", str(6 * PAGE))
    with Client(srv.address, timeout=30) as c:
        tree = Tree(c, np.random.default_rng(5))
        src = tree.root(37)  # 6 pages of 6
        f = tree.fork(src)
        for s in (f, src):
            with pytest.raises(Q8KVError) as err:
                s.append_and_attend(0, *qkv(tree.rng, 1, GEO))
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert s.info().layer_lengths == [37, 37]
        cache = caches(f, GEO.num_layers)
        assert caches(src, GEO.num_layers) == cache
        src.delete()
        tree.append(f, 2)
        assert f.info().layer_lengths == [39, 39]
        assert metric(srv.metrics_url, "q8kv_pool_used_bytes") == 6 * PAGE


def test_another_tenants_session_cannot_be_forked(start_server):
    """bravo forking alpha's session id gets exactly the NOT_FOUND of an id that does not
    exist, and alpha's session is untouched; bravo may use the same id for its own."""
    srv = start_server(
        "--page-bytes", str(PCB), env={"Q8KV_AUTH_TOKENS": f"{TOKEN_A} alpha,{TOKEN_B} bravo"}
    )
    with (
        Client(srv.address, token=TOKEN_A, timeout=30) as a,
        Client(srv.address, token=TOKEN_B, timeout=30) as b,
    ):
        src = Tree(a, np.random.default_rng(9)).root(37, session_id="shared-name")
        cache = caches(src, GEO.num_layers)
        errors = []
        for sid in ("shared-name", "never-existed"):
            with pytest.raises(Q8KVError) as err:
                b.fork_session(sid, session_id="mine")
            errors.append((err.value.code, err.value.message.replace(sid, "ID")))
        assert errors[0] == errors[1] and errors[0][0] == grpc.StatusCode.NOT_FOUND
        assert b.list_sessions() == []
        own = b.create_session(**GEO, session_id="shared-name")
        assert own.fork().info().layer_lengths == [0, 0]  # bravo's own, empty session
        assert caches(src, GEO.num_layers) == cache
        assert [s.id for s in a.list_sessions()] == ["shared-name"]


def test_forking_cannot_get_a_tenant_past_its_limits(start_server):
    """Forking over and over stops at --tenant-max-sessions; forks cost no pages, but the
    copies their appends make count, and stop at --tenant-max-bytes with nothing appended.
    Another tenant is unaffected."""
    srv = start_server(
        "--page-bytes",
        str(PCB),
        "--tenant-max-sessions",
        "4",
        "--tenant-max-bytes",
        str(8 * PAGE),
        env={"Q8KV_AUTH_TOKENS": f"{TOKEN_A} alpha,{TOKEN_B} bravo"},
    )
    with (
        Client(srv.address, token=TOKEN_A, timeout=30) as a,
        Client(srv.address, token=TOKEN_B, timeout=30) as b,
    ):
        tree = Tree(a, np.random.default_rng(11))
        src = tree.root(37)  # 6 pages
        forks = [tree.fork(src) for _ in range(3)]
        with pytest.raises(Q8KVError) as err:
            src.fork()
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "maximum of 4 sessions" in err.value.message
        tree.append(forks[0], 1)  # 2 copies: 8 pages, the tenant's limit
        with pytest.raises(Q8KVError) as err:
            forks[1].append_and_attend(0, *qkv(tree.rng, 1, GEO))
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant memory" in err.value.message
        assert forks[1].info().layer_lengths == [37, 37]
        Tree(b, np.random.default_rng(12)).root(37)  # bravo: its own limits
        forks[0].delete()  # its copies go back: forks[1] can copy now
        tree.append(forks[1], 1)
        assert [f.info().layer_lengths for f in forks[1:]] == [[38, 38], [37, 37]]
        assert caches(forks[2], GEO.num_layers) == caches(src, GEO.num_layers)


def test_a_packed_batch_of_a_source_and_its_forks_copies_the_shared_page_per_session(
    start_server,
):
    """One AttendBatch names a source and two forks that share its partly filled last page:
    each session copies the page for itself inside the one packed call, and every output
    and cache equals a session fed the same tokens from scratch."""
    srv = start_server("--page-bytes", str(PCB))
    rng = np.random.default_rng(61)
    with Client(srv.address, timeout=30) as c:
        tree = Tree(c, rng)
        source = tree.root(T + 5)  # a partly filled second page
        forks = [tree.fork(source), tree.fork(source, length=T + 2)]
        members = [source, *forks]
        for step in range(3):  # decode steps, then a short prefill
            n = 1 if step < 2 else 4
            for layer in range(GEO.num_layers):
                ts = [qkv(rng, n, GEO) for _ in members]
                q, k, v = (np.stack([t[i] for t in ts]) for i in range(3))
                out = c.attend_batch(layer, members, q, k, v)
                for b, s in enumerate(members):
                    tree.calls[s].append((layer, ts[b], out[b]))
        for s in members:
            tree.check(s)
        for s in members:
            s.delete()
        assert metric(srv.metrics_url, "q8kv_pool_used_bytes") == 0
