"""Page pool, session store and eviction bookkeeping (server/cache.py)."""

from __future__ import annotations

import math
import time
from collections import Counter

import pytest

from q8kv.server import cache as cache_module
from q8kv.server.backends.base import page_bytes, tokens_per_page
from q8kv.server.cache import MIN_TTL_SECONDS, Geometry, PagePool, Session, SessionStore
from q8kv.server.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
)

PCB = 4096  # page_code_bytes: small pages, so a few tokens fill one


class FakeClock:
    """A time.monotonic stand-in that only moves when told (starts at the real clock, as
    sessions are stamped at creation with the real one)."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(cache_module.session.time, "monotonic", fake)
    return fake


def make_store(num_pages: int = 64, max_sessions: int = 16, **kwargs) -> SessionStore:
    return SessionStore(PagePool(num_pages, PCB), max_sessions=max_sessions, **kwargs)


def geo(layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 64, max_len=1000):
    return Geometry(layers, heads, kv_heads, head_dim, max_len)


def grow(store: SessionStore, session: Session, layer: int, length: int) -> list[int]:
    """Grow a layer to ``length`` tokens the way the engine does."""
    cache = session.layers[layer]
    added = store.reserve(session, cache, length)
    store.set_length(session, cache, length)
    return added


def check_accounting(store: SessionStore) -> None:
    """Pages per layer = ceil(len / T), so at most one partly filled page per layer; every
    page belongs to one layer; the pool's used count is the pages the sessions hold."""
    held: list[int] = []
    for session in store:
        tpp = session.layout.tokens_per_page
        for layer in session.layers:
            assert len(layer.pages) == -(-layer.length // tpp)
            assert 0 <= len(layer.pages) * tpp - layer.length < tpp
            held.extend(layer.pages)
    assert len(held) == len(set(held)) == store.pool.used_pages
    assert store.pool.used_pages + store.pool.free_pages == store.pool.num_pages
    assert all(0 <= p < store.pool.num_pages for p in held)
    # The O(1) byte counters agree with the lengths.
    values = sum(s.tokens * 2 * s.geometry.num_kv_heads * s.geometry.head_dim for s in store)
    assert store.cached_values == values
    assert store.cache_bytes() == sum(s.tokens * s.geometry.token_bytes() for s in store)
    assert store.fp32_equivalent_bytes() == 4 * values
    assert store.fp16_equivalent_bytes() == 2 * values


# -- layout arithmetic -------------------------------------------------------------------


@pytest.mark.parametrize(
    "pcb,kv_heads,head_dim,expected",
    [
        (4096, 2, 64, 16),
        (4096, 8, 256, 1),
        (4096, 3, 128, 4),
        (4096, 1, 32, 64),
        (65536, 8, 128, 32),
        (65536, 1, 64, 512),
        (4096, 8, 512, 0),
        (4096, 5, 96, 4),
    ],
)
def test_tokens_per_page(pcb: int, kv_heads: int, head_dim: int, expected: int) -> None:
    """T is the largest power of two with 2 * KVH * D * T <= page_code_bytes (0: none fit)."""
    t = tokens_per_page(pcb, kv_heads, head_dim)
    assert t == expected
    if t:
        assert t & (t - 1) == 0
        assert 2 * kv_heads * head_dim * t <= pcb < 2 * kv_heads * head_dim * 2 * t


def test_byte_sizes() -> None:
    """A page is its codes plus a float32 scale per 32 codes; a token of a layer takes
    36 bytes per 32 values of K and V (128 / 36 = 3.56x smaller than fp32)."""
    assert page_bytes(4096) == 4096 + 512
    g = geo(heads=8, kv_heads=2, head_dim=128)
    assert g.token_bytes() == 2 * 2 * 4 * 36
    assert (2 * 2 * 128 * 4) / g.token_bytes() == pytest.approx(128 / 36)


# -- page accounting ---------------------------------------------------------------------


def test_page_accounting_follows_lengths() -> None:
    """Memory grows with tokens, not max_len: pages per layer = ceil(len / T), pool
    used/free add up, reserved bytes >= cache bytes with under one page of waste per layer."""
    store = make_store(num_pages=200)
    a = store.create(geo(layers=3, max_len=100_000))
    b = store.create(geo(layers=1, kv_heads=4, head_dim=128))
    assert store.pool.used_pages == 0 and store.cache_bytes() == 0
    tpp_a, tpp_b = a.layout.tokens_per_page, b.layout.tokens_per_page
    assert (tpp_a, tpp_b) == (16, 4)
    for length, layer in [(1, 0), (16, 1), (17, 2), (5, 0), (48, 1), (49, 2), (100, 0)]:
        grow(store, a, layer, length)
        check_accounting(store)
    for length in (1, 3, 4, 5, 13):
        grow(store, b, 0, length)
        check_accounting(store)
    assert [len(layer.pages) for layer in a.layers] == [7, 3, 4]
    assert len(b.layers[0].pages) == 4
    assert store.pool.used_pages == 18 and store.pool.free_pages == 182
    assert a.tokens == 100 + 48 + 49 and a.pages_held == 14
    cache_bytes = a.tokens * a.geometry.token_bytes() + 13 * b.geometry.token_bytes()
    assert store.cache_bytes() == cache_bytes
    assert store.fp32_equivalent_bytes() == (a.tokens * 2 * 2 * 64 + 13 * 2 * 4 * 128) * 4
    reserved = store.pool.used_pages * store.pool.page_bytes
    assert reserved >= cache_bytes
    # Waste: at most one page per session-layer beyond what the tokens need.
    assert reserved - cache_bytes < (3 + 1) * store.pool.page_bytes


def test_reserve_covered_length_takes_nothing() -> None:
    """Reserving within the pages a layer already has adds none; reserving past them adds
    exactly the missing pages, at the end of the page table."""
    store = make_store()
    s = store.create(geo())
    grow(store, s, 0, 20)  # T = 16: 2 pages
    free = store.pool.free_pages
    assert store.reserve(s, s.layers[0], 32) == []
    assert store.pool.free_pages == free
    added = store.reserve(s, s.layers[0], 70)
    assert len(added) == 3 and s.layers[0].pages[-3:] == added
    assert store.pool.free_pages == free - 3


def test_pages_are_reused_after_being_freed() -> None:
    """A freed page goes back to the pool and is handed out again."""
    store = make_store(num_pages=4)
    s = store.create(geo(layers=1))
    grow(store, s, 0, 64)
    assert store.pool.free_pages == 0
    store.truncate(s, 0)
    assert store.pool.free_pages == 4
    t = store.create(geo(layers=1))
    grow(store, t, 0, 64)
    assert sorted(t.layers[0].pages) == [0, 1, 2, 3]


def test_reserve_past_max_len_is_out_of_range() -> None:
    """Appending past max_len: OUT_OF_RANGE naming the lengths and max_len; no page taken."""
    store = make_store()
    s = store.create(geo(max_len=40))
    grow(store, s, 1, 30)
    free = store.pool.free_pages
    with pytest.raises(OutOfRange) as info:
        store.reserve(s, s.layers[1], 41)
    assert "30" in info.value.message and "41" in info.value.message
    assert "max_len 40" in info.value.message
    assert store.pool.free_pages == free and len(s.layers[1].pages) == 2
    grow(store, s, 1, 40)  # exactly max_len is fine
    check_accounting(store)


# -- truncate and delete -----------------------------------------------------------------


def test_truncate_frees_pages() -> None:
    """Truncate cuts every layer to at most ``length`` and frees the pages past it; layers
    already shorter are untouched; a longer length changes nothing."""
    store = make_store()
    s = store.create(geo(layers=3))
    for layer, length in enumerate((100, 20, 5)):
        grow(store, s, layer, length)
    assert store.pool.used_pages == 7 + 2 + 1
    store.truncate(s, 200)
    assert [layer.length for layer in s.layers] == [100, 20, 5] and store.pool.used_pages == 10
    store.truncate(s, 17)
    assert [layer.length for layer in s.layers] == [17, 17, 5]
    assert store.pool.used_pages == 2 + 2 + 1
    check_accounting(store)
    store.truncate(s, 16)
    assert store.pool.used_pages == 1 + 1 + 1
    store.truncate(s, 0)
    assert store.pool.used_pages == 0 and s.tokens == 0
    check_accounting(store)
    with pytest.raises(InvalidArgument, match="length: expected >= 0, got -1"):
        store.truncate(s, -1)


def test_delete_frees_everything() -> None:
    """Delete returns every page of every layer to the pool, reports their bytes, and the
    session is gone."""
    store = make_store()
    s = store.create(geo(layers=2), session_id="doomed")
    keep = store.create(geo(layers=1))
    grow(store, s, 0, 33)
    grow(store, s, 1, 2)
    grow(store, keep, 0, 10)
    assert store.delete("doomed") == 4 * store.pool.page_bytes
    assert store.pool.used_pages == 1 and len(store) == 1
    with pytest.raises(NotFound):
        store.get("doomed")
    with pytest.raises(NotFound):
        store.delete("doomed")
    check_accounting(store)


# -- limits ------------------------------------------------------------------------------


def test_max_sessions() -> None:
    """Past max_sessions, create is RESOURCE_EXHAUSTED naming the limit; a delete makes room."""
    store = make_store(max_sessions=3)
    ids = [store.create(geo()).id for _ in range(3)]
    with pytest.raises(ResourceExhausted, match="maximum of 3 sessions"):
        store.create(geo())
    assert len(store) == 3
    store.delete(ids[1])
    store.create(geo(), session_id="again")
    assert len(store) == 3


def test_max_sessions_evicts_expired_first(clock: FakeClock) -> None:
    """A create at the session limit first evicts sessions past their TTL."""
    store = make_store(max_sessions=2)
    reasons: list[tuple[str, str]] = []
    store.listeners.append(lambda session, reason: reasons.append((session.id, reason)))
    store.create(geo(), session_id="old", ttl_seconds=5)
    store.create(geo(), session_id="live")
    clock.advance(6)
    store.create(geo(), session_id="new")
    assert {s.id for s in store} == {"live", "new"} and reasons == [("old", "ttl")]


def test_pool_full_is_resource_exhausted_and_changes_nothing() -> None:
    """When the pool cannot cover an append: RESOURCE_EXHAUSTED naming the memory budget
    and the pages needed/free; the layer and the pool are as before."""
    store = make_store(num_pages=5)
    s = store.create(geo(layers=2))
    grow(store, s, 0, 64)  # 4 pages
    with pytest.raises(ResourceExhausted) as info:
        store.reserve(s, s.layers[1], 33)  # needs 3, 1 free
    message = info.value.message
    assert "memory budget" in message
    assert "needed 3" in message and "1 of 5" in message and str(store.pool.page_bytes) in message
    assert store.pool.free_pages == 1 and s.layers[1].pages == [] and s.layers[1].length == 0
    check_accounting(store)


# -- eviction ----------------------------------------------------------------------------


def test_ttl_expiry(clock: FakeClock) -> None:
    """evict_expired drops sessions idle longer than their TTL (own, else the store's
    default; 0 = never), frees their pages, and tells the listeners with reason 'ttl'."""
    store = make_store(default_ttl=30)
    events: Counter[str] = Counter()
    store.listeners.append(lambda session, reason: events.update([reason]))
    short = store.create(geo(), session_id="short", ttl_seconds=10)
    default = store.create(geo(), session_id="default")
    assert short.ttl_seconds == 10 and default.ttl_seconds == 30
    never = make_store()
    forever = never.create(geo())
    for s in (short, default, forever):
        s.touch()  # stamp with the fake clock
    grow(store, short, 0, 40)
    clock.advance(9)
    assert store.evict_expired() == 0
    clock.advance(2)
    assert store.evict_expired() == 1
    assert {s.id for s in store} == {"default"} and store.pool.used_pages == 0
    with pytest.raises(NotFound):
        store.get("short")
    default.touch()  # use resets the clock
    clock.advance(29)
    assert store.evict_expired() == 0
    clock.advance(2)
    assert store.evict_expired() == 1 and len(store) == 0
    assert events == Counter(ttl=2)
    clock.advance(1e6)
    assert never.evict_expired() == 0 and len(never) == 1


def test_make_room_evicts_expired_before_failing(clock: FakeClock) -> None:
    """A reserve that finds the pool full evicts expired sessions (even with LRU off)."""
    store = make_store(num_pages=4)
    old = store.create(geo(layers=1), ttl_seconds=5)
    old.touch()
    grow(store, old, 0, 64)
    fresh = store.create(geo(layers=1))
    clock.advance(10)
    grow(store, fresh, 0, 20)
    assert len(store) == 1 and store.pool.used_pages == 2


def test_lru_eviction_only_evicts_idle_sessions(clock: FakeClock) -> None:
    """With evict_idle_seconds > 0, a full pool evicts the least recently used sessions idle
    at least that long, oldest first and only as many as needed; busy ones are kept; the
    reason 'lru' reaches the listeners; if evicting cannot make room, nobody is evicted."""
    store = make_store(num_pages=8, evict_idle_seconds=10)
    reasons: Counter[str] = Counter()
    evicted: list[str] = []
    store.listeners.append(
        lambda session, reason: (reasons.update([reason]), evicted.append(session.id))
    )
    sessions = {}
    for name in ("a", "b", "c", "busy"):
        sessions[name] = store.create(geo(layers=1), session_id=name)
        grow(store, sessions[name], 0, 32)  # 2 pages each: the pool is full
    # Last used: a 30 s ago, b 20 s, c 15 s, busy 1 s.
    for name, ago in [("a", 30), ("b", 20), ("c", 15), ("busy", 1)]:
        sessions[name].last_used_mono = clock.now - ago
    new = store.create(geo(layers=1), session_id="new")
    new.touch()
    grow(store, new, 0, 48)  # 3 pages: evicts a, then b
    assert evicted == ["a", "b"] and reasons == Counter(lru=2)
    assert {s.id for s in store} == {"c", "busy", "new"}
    check_accounting(store)
    # 6 more pages: only c is idle enough (busy is not, new is the one appending), and
    # evicting c cannot make room: the append fails and nobody is evicted for nothing.
    with pytest.raises(ResourceExhausted, match="memory budget"):
        grow(store, new, 0, 48 + 16 * 6)
    assert evicted == ["a", "b"]
    assert {s.id for s in store} == {"c", "busy", "new"}
    assert sessions["busy"].layers[0].length == 32
    assert new.layers[0].length == 48
    check_accounting(store)


def test_lru_off_never_evicts(clock: FakeClock) -> None:
    """With evict_idle_seconds = 0 (the default), a full pool fails instead of evicting."""
    store = make_store(num_pages=2)
    idle = store.create(geo(layers=1))
    grow(store, idle, 0, 32)
    idle.last_used_mono = clock.now - 1e6
    other = store.create(geo(layers=1))
    with pytest.raises(ResourceExhausted):
        grow(store, other, 0, 1)
    assert len(store) == 2 and idle.layers[0].length == 32


def test_lru_never_evicts_the_session_it_makes_room_for(clock: FakeClock) -> None:
    """The session being appended to is never its own eviction victim, however idle."""
    store = make_store(num_pages=2, evict_idle_seconds=1)
    s = store.create(geo(layers=2))
    grow(store, s, 0, 32)
    s.last_used_mono = clock.now - 100
    with pytest.raises(ResourceExhausted):
        store.reserve(s, s.layers[1], 1)
    assert store.get(s.id) is s and s.layers[0].length == 32


# -- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "geometry,field,expected,actual",
    [
        (Geometry(0, 4, 2, 64, 10), "geometry.num_layers", "1..4096", "0"),
        (Geometry(1, 0, 1, 64, 10), "geometry.num_heads", "1..1024", "0"),
        (Geometry(1, 4, 0, 64, 10), "geometry.num_kv_heads", "1..1024", "0"),
        (Geometry(1, 4, 2, 0, 10), "geometry.head_dim", "32..1024", "0"),
        (Geometry(1, 4, 2, 48, 10), "geometry.head_dim", "a multiple of 32", "48"),
        (Geometry(1, 4, 2, 64, 0), "geometry.max_len", "1..16777216", "0"),
        (Geometry(1, 6, 4, 64, 10), "geometry.num_heads", "a multiple of num_kv_heads (4)", "6"),
        (Geometry(1, 8, 8, 512, 10), "geometry", "fit a page of 4096 bytes", "8192"),
    ],
)
def test_geometry_validation_messages(
    geometry: Geometry, field: str, expected: str, actual: str
) -> None:
    """Bad geometry is INVALID_ARGUMENT whose message names the field, the expected and the
    actual value; nothing is created."""
    store = make_store()
    with pytest.raises(InvalidArgument) as info:
        store.create(geometry)
    message = info.value.message
    assert message.startswith(field + ":"), message
    assert expected in message and message.endswith(actual), message
    assert len(store) == 0


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"ttl_seconds": -1}, "ttl_seconds"),
        ({"ttl_seconds": math.inf}, "ttl_seconds"),
        ({"ttl_seconds": math.nan}, "ttl_seconds"),
        ({"softmax_scale": 0.0}, "softmax_scale"),
        ({"softmax_scale": -0.1}, "softmax_scale"),
        ({"softmax_scale": math.nan}, "softmax_scale"),
        ({"softmax_scale": math.inf}, "softmax_scale"),
        ({"softmax_scale": 1000.5}, "softmax_scale"),
        ({"softmax_scale": 1e30}, "softmax_scale"),
        ({"session_id": "a b"}, "session_id"),
        ({"session_id": "x" * 129}, "session_id"),
        ({"session_id": "é"}, "session_id"),
    ],
)
def test_create_argument_validation(kwargs: dict, field: str) -> None:
    """Bad TTL, softmax scale or session id: INVALID_ARGUMENT naming the field and value."""
    store = make_store()
    with pytest.raises(InvalidArgument) as info:
        store.create(geo(), **kwargs)
    assert info.value.message.startswith(field + ": expected"), info.value.message
    assert "got" in info.value.message
    assert len(store) == 0


def test_session_ids() -> None:
    """A client-chosen id is kept; a duplicate is ALREADY_EXISTS; no id gets a UUID4."""
    store = make_store()
    s = store.create(geo(), session_id="tenant-a:chat.42_x")
    assert s.id == "tenant-a:chat.42_x" and store.get(s.id) is s
    with pytest.raises(AlreadyExists, match="tenant-a:chat.42_x"):
        store.create(geo(), session_id="tenant-a:chat.42_x")
    generated = store.create(geo())
    assert len(generated.id) == 36 and generated.id[14] == "4"
    assert generated.id != store.create(geo()).id


def test_layer_index_out_of_range() -> None:
    """A layer past num_layers is INVALID_ARGUMENT naming the range and the value."""
    store = make_store()
    s = store.create(geo(layers=2), session_id="s")
    for bad in (2, -1):
        with pytest.raises(InvalidArgument, match=rf"layer: expected 0\.\.1 .*got {bad}"):
            s.layer(bad)
    assert s.layer(1) == s.layers[1] and s.layer(1).index == 1


def test_tenant_isolation() -> None:
    """Another tenant's session answers NOT_FOUND exactly as a missing one does; it can
    neither get nor delete it."""
    store = make_store()
    s = store.create(geo(), session_id="shared-name", tenant="alice")
    assert store.get("shared-name", tenant="alice") is s
    with pytest.raises(NotFound) as other:
        store.get("shared-name", tenant="bob")
    with pytest.raises(NotFound) as missing:
        store.get("no-such-session", tenant="alice")
    assert other.value.message == "session_id: no session 'shared-name'"
    assert missing.value.message == other.value.message.replace("shared-name", "no-such-session")
    with pytest.raises(NotFound):
        store.get("shared-name")  # the default tenant is a tenant too
    with pytest.raises(NotFound):
        store.delete("shared-name", tenant="bob")
    assert store.get("shared-name", tenant="alice") is s and len(store) == 1


def test_softmax_scale_bound_is_named() -> None:
    """softmax_scale above 1e3 is refused naming the field, the bound and the value; the
    bound itself is accepted."""
    store = make_store()
    with pytest.raises(InvalidArgument) as info:
        store.create(geo(), softmax_scale=5e3)
    assert info.value.message == (
        "softmax_scale: expected a finite value > 0 and <= 1000, got 5000.0"
    )
    assert store.create(geo(), softmax_scale=1e3).softmax_scale == 1e3


# -- TTL bounds and what counts as use ------------------------------------------------------


@pytest.mark.parametrize(
    "server_ttl,client_ttl,effective",
    [
        (3600, 0, 3600),  # 0: the server's default
        (3600, 1e300, 3600),  # above --session-ttl: clamped to it
        (3600, 3601, 3600),
        (3600, 120, 120),
        (3600, 1e-6, MIN_TTL_SECONDS),  # below the floor: raised to it
        (3600, 0.5, MIN_TTL_SECONDS),
        (0, 1e300, 1e300),  # --session-ttl 0 (never): no upper bound
        (0, 0, 0),
        (0, 1e-6, MIN_TTL_SECONDS),
    ],
)
def test_ttl_is_bounded_by_the_server(server_ttl, client_ttl, effective) -> None:
    """A client's ttl_seconds is clamped to [MIN_TTL_SECONDS, --session-ttl]; the
    session reports the ttl it got."""
    store = make_store(default_ttl=server_ttl)
    assert store.create(geo(), ttl_seconds=client_ttl).ttl_seconds == effective


def test_clamped_ttl_frees_session_slots(clock: FakeClock) -> None:
    """Sessions asking for a near-endless ttl no longer hold --max-sessions forever: they
    expire after the server's ttl and a new session takes a slot."""
    store = make_store(max_sessions=3, default_ttl=30)
    for _ in range(3):
        store.create(geo(), ttl_seconds=1e300).touch()
    with pytest.raises(ResourceExhausted, match="maximum of 3 sessions"):
        store.create(geo())
    clock.advance(31)
    store.create(geo(), session_id="fresh")
    assert [s.id for s in store] == ["fresh"]


def test_reads_by_id_are_a_use_listing_is_not(clock: FakeClock) -> None:
    """get (GetSession, Dequantize, ExportSession, appends) restarts the idle clock;
    list_page (ListSessions) does not, so listing keeps nothing alive."""
    store = make_store(default_ttl=10)
    s = store.create(geo(), session_id="s")
    s.touch()
    clock.advance(8)
    store.get("s")
    clock.advance(8)
    assert store.evict_expired() == 0  # 16 s since creation, 8 since the read
    store.read("s")
    clock.advance(8)
    listed, more = store.list_page("", "", 10)
    assert [x.id for x in listed] == ["s"] and not more
    clock.advance(3)  # 11 s since the last read, though listed 3 s ago
    assert store.evict_expired() == 1


def test_list_page_is_sorted_per_tenant_and_bounded() -> None:
    """list_page returns the tenant's sessions after the token, in id order, at most
    ``size``, and whether more follow; snapshots hold the lengths as they were."""
    store = make_store(num_pages=64, max_sessions=32)
    ids = [f"s{i:02d}" for i in range(7)]
    for sid in reversed(ids):
        store.create(geo(), session_id=sid, tenant="alice")
    store.create(geo(), session_id="s00x", tenant="bob")
    page, more = store.list_page("alice", "", 3)
    assert [x.id for x in page] == ids[:3] and more
    page, more = store.list_page("alice", ids[2], 3)
    assert [x.id for x in page] == ids[3:6] and more
    page, more = store.list_page("alice", ids[5], 3)
    assert [x.id for x in page] == ids[6:] and not more
    s = store.get("s03", "alice")
    grow(store, s, 1, 20)
    snap = store.read("s03", "alice")
    grow(store, s, 1, 40)
    assert snap.layer_lengths == [0, 20] and snap.tokens == 20 and snap.pages_held == 2


def test_empty_session_metadata_is_small() -> None:
    """An empty 4,096-layer session costs well under 64 KiB of host memory (layer lengths
    in one int32 array; page lists only for layers that hold pages): --max-sessions of
    them stay outside the memory budget's blind spot."""
    import tracemalloc

    store = make_store(max_sessions=8)
    g = geo(layers=4096)
    store.create(g)  # warm up allocator and caches
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        sessions = [store.create(g) for _ in range(4)]
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert grown / len(sessions) < 24 * 1024, grown
    grow(store, sessions[0], 4095, 3)
    assert sessions[0].layers[4095].length == 3 and len(sessions[0].page_lists) == 1
    check_accounting(store)
