"""Who may do what: bearer tokens (file reloaded on SIGHUP, and the environment), tenants
that cannot see each other's sessions on any RPC, per-tenant limits, and tokens that never
reach the logs."""

from __future__ import annotations

import re
import signal

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from harness.geometry import GEOM, Geo
from harness.logs import wait_for_log
from harness.rpc import bearer, random_item, stub
from harness.server import ServerProcess
from harness.sessions import caches, fill
from harness.tensors import qkv

from q8kv.client import Client, Q8KVError
from q8kv.v1 import kvcache_pb2 as pb

TOKEN_A = "alpha-token-0123456789"
TOKEN_B = "bravo-token-9876543210"
TOKEN_C = "charlie-env-token-5555"  # from Q8KV_AUTH_TOKENS
TOKEN_D = "delta-token-added-later"
SECRETS = (TOKEN_A, TOKEN_B, TOKEN_C, TOKEN_D)


def write_tokens(path, *pairs):
    path.write_text("# token tenant\n" + "".join(f"{t} {n}\n" for t, n in pairs))


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "tokens"
    write_tokens(path, (TOKEN_A, "alpha"), (TOKEN_B, "bravo"))
    return path


@pytest.fixture(scope="module")
def authed(tokens_file):
    srv = ServerProcess(
        "--auth-tokens-file", str(tokens_file), "--log-level", "DEBUG",
        env={"Q8KV_AUTH_TOKENS": f"{TOKEN_C} charlie"},
    )
    yield srv
    srv.stop()


def batch_of(sid: str, item: pb.AttendItem) -> pb.AttendBatchRequest:
    """``item`` as a packed batch of one session (a batch axis of length 1)."""

    def one_row(tensor: pb.Tensor) -> pb.Tensor:
        return pb.Tensor(dtype=tensor.dtype, shape=[1, *tensor.shape], data=tensor.data)

    return pb.AttendBatchRequest(
        session_ids=[sid], layer=item.layer, q=one_row(item.q), k=one_row(item.k),
        v=one_row(item.v),
    )


def every_rpc(s, metadata, sid="some-session", rng=None):
    """Call every KVCacheService RPC once; returns {name: (code, details)}."""
    rng = rng or np.random.default_rng(0)
    item = random_item(sid, 0, rng)
    chunk = pb.SessionChunk(header=pb.SessionHeader(format_version=1, session_id=sid))
    calls = {
        "CreateSession": lambda: s.CreateSession(
            pb.CreateSessionRequest(session_id=sid, geometry=GEOM.pb()),
            metadata=metadata, timeout=10,
        ),
        "GetSession": lambda: s.GetSession(
            pb.GetSessionRequest(session_id=sid), metadata=metadata, timeout=10
        ),
        "ListSessions": lambda: s.ListSessions(
            pb.ListSessionsRequest(), metadata=metadata, timeout=10
        ),
        "DeleteSession": lambda: s.DeleteSession(
            pb.DeleteSessionRequest(session_id=sid), metadata=metadata, timeout=10
        ),
        "TruncateSession": lambda: s.TruncateSession(
            pb.TruncateSessionRequest(session_id=sid, length=0), metadata=metadata, timeout=10
        ),
        "ForkSession": lambda: s.ForkSession(
            pb.ForkSessionRequest(source_session_id=sid), metadata=metadata, timeout=10
        ),
        "AppendAndAttend": lambda: s.AppendAndAttend(
            pb.AppendAndAttendRequest(items=[item]), metadata=metadata, timeout=10
        ),
        "AppendAndAttendStream": lambda: list(
            s.AppendAndAttendStream(
                iter([pb.AppendAndAttendStreamRequest(request_id=1, items=[item])]),
                metadata=metadata, timeout=10,
            )
        ),
        "AttendBatch": lambda: s.AttendBatch(
            batch_of(sid, item), metadata=metadata, timeout=10
        ),
        "Dequantize": lambda: s.Dequantize(
            pb.DequantizeRequest(session_id=sid, layer=0), metadata=metadata, timeout=10
        ),
        "ExportSession": lambda: list(
            s.ExportSession(pb.ExportSessionRequest(session_id=sid), metadata=metadata,
                            timeout=10)
        ),
        "ImportSession": lambda: s.ImportSession(iter([chunk]), metadata=metadata, timeout=10),
    }
    assert set(calls) == set(pb.DESCRIPTOR.services_by_name["KVCacheService"].methods_by_name)
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = (grpc.StatusCode.OK, "")
        except grpc.RpcError as exc:
            out[name] = (exc.code(), exc.details())
    return out


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        bearer("not-a-known-token"),
        bearer(TOKEN_A + "x"),
        (("authorization", f"Basic {TOKEN_A}"),),
        (("authorization", "Bearer "),),
        (("x-api-key", TOKEN_A),),
    ],
    ids=["none", "unknown", "prefix-of-known", "wrong-scheme", "empty", "other-header"],
)
def test_missing_or_unknown_token_is_refused_on_every_rpc_but_health(authed, metadata):
    with grpc.insecure_channel(authed.address) as channel:
        results = every_rpc(stub(channel), metadata)
        assert {name: code for name, (code, _) in results.items()} == {
            name: grpc.StatusCode.UNAUTHENTICATED for name in results
        }
        assert all(d.startswith("authorization: ") for _, d in results.values()), results
        # Reflection is not open either (it lists the service's methods).
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                metadata=metadata, timeout=10,
            ))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Health stays open: probes carry no secret.
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_known_tokens_from_file_and_environment_work(authed):
    for token in (TOKEN_A, TOKEN_B, TOKEN_C):
        with Client(authed.address, token=token) as c:
            s = c.create_session(**GEOM)
            s.append_and_attend(0, *qkv(np.random.default_rng(1), 3, GEOM))
            assert s.info().layer_lengths == [3, 0, 0]
            s.delete()
    with grpc.insecure_channel(authed.address) as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        (reply,) = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
            metadata=bearer(TOKEN_A), timeout=10,
        )
        names = [s.name for s in reply.list_services_response.service]
        assert "q8kv.v1.KVCacheService" in names


def normalised(results, sid):
    """Codes and details with the probed id replaced, so two ids compare equal."""
    return {name: (code, details.replace(sid, "<id>")) for name, (code, details) in results.items()}


def test_second_tenant_cannot_tell_a_session_from_a_missing_one(authed):
    rng = np.random.default_rng(2)
    with Client(authed.address, token=TOKEN_A) as alpha:
        s = alpha.create_session(**GEOM, session_id="alpha-secret-1")
        fill(s, rng, [5, 3, 0])
        before = caches(s, 3), s.info().layer_lengths
        exported = alpha.export_session(s)

        with grpc.insecure_channel(authed.address) as channel:
            bravo = stub(channel)
            probed = every_rpc(bravo, bearer(TOKEN_B), "alpha-secret-1", rng)
            # The same calls on an id nobody has: the same answers, code and message.
            missing = every_rpc(bravo, bearer(TOKEN_B), "nobody-has-this", rng)
            assert normalised(probed, "alpha-secret-1") == normalised(missing, "nobody-has-this")
            codes = {name: code for name, (code, _) in probed.items()}
            for name in ("GetSession", "DeleteSession", "TruncateSession", "AppendAndAttend",
                         "Dequantize", "ExportSession"):
                # ... after bravo's CreateSession made its own session of that id, these
                # found bravo's; run them again on a fresh id of alpha's below.
                assert codes[name] in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OK), probed
            assert codes["CreateSession"] == grpc.StatusCode.OK  # an id of its own
            # An import of alpha's exported session lands in bravo's namespace.
            reply = bravo.ImportSession(iter(exported), metadata=bearer(TOKEN_B), timeout=10)
            assert reply.session.session_id == "alpha-secret-1"

        # Probes on every per-session RPC before bravo holds an id of that name.
        s2 = alpha.create_session(**GEOM, session_id="alpha-secret-2")
        fill(s2, rng, [4, 0, 2])
        before2 = caches(s2, 3)
        with grpc.insecure_channel(authed.address) as channel:
            bravo = stub(channel)
            metadata = bearer(TOKEN_B)
            probes = {
                "GetSession": lambda sid: bravo.GetSession(
                    pb.GetSessionRequest(session_id=sid), metadata=metadata, timeout=10),
                "DeleteSession": lambda sid: bravo.DeleteSession(
                    pb.DeleteSessionRequest(session_id=sid), metadata=metadata, timeout=10),
                "TruncateSession": lambda sid: bravo.TruncateSession(
                    pb.TruncateSessionRequest(session_id=sid), metadata=metadata, timeout=10),
                "AppendAndAttend": lambda sid: bravo.AppendAndAttend(
                    pb.AppendAndAttendRequest(items=[random_item(sid, 0, rng)]),
                    metadata=metadata, timeout=10),
                "ForkSession": lambda sid: bravo.ForkSession(
                    pb.ForkSessionRequest(source_session_id=sid, session_id="bravo-fork"),
                    metadata=metadata, timeout=10),
                "AttendBatch": lambda sid: bravo.AttendBatch(
                    batch_of(sid, random_item(sid, 0, rng)), metadata=metadata, timeout=10),
                "Dequantize": lambda sid: bravo.Dequantize(
                    pb.DequantizeRequest(session_id=sid, layer=0), metadata=metadata,
                    timeout=10),
                "ExportSession": lambda sid: list(bravo.ExportSession(
                    pb.ExportSessionRequest(session_id=sid), metadata=metadata, timeout=10)),
            }
            for name, probe in probes.items():
                answers = []
                for sid in ("alpha-secret-2", "nobody-has-this-2"):
                    with pytest.raises(grpc.RpcError) as err:
                        probe(sid)
                    answers.append((err.value.code(), err.value.details().replace(sid, "<id>")))
                assert answers[0] == answers[1], (name, answers)
                prefix = {"AttendBatch": "batch[0] (session '<id>'): ",
                          "ForkSession": "source_"}.get(name, "")
                assert answers[0] == (
                    grpc.StatusCode.NOT_FOUND, f"{prefix}session_id: no session '<id>'"
                )
            # In a stream, a message on alpha's session fails like one on a missing id.
            (reply,) = bravo.AppendAndAttendStream(
                iter([
                    pb.AppendAndAttendStreamRequest(
                        request_id=7, items=[random_item("alpha-secret-2", 0, rng)]
                    )
                ]),
                metadata=metadata, timeout=10,
            )
            assert reply.error_code == grpc.StatusCode.NOT_FOUND.value[0]
            assert reply.error_message == "session_id: no session 'alpha-secret-2'"
            assert not reply.results

        # Nothing of alpha's changed.
        assert caches(s, 3) == before[0] and s.info().layer_lengths == before[1]
        assert caches(s2, 3) == before2
        assert s2.info().layer_lengths == [4, 0, 2]
        # bravo's namesakes are bravo's own: deleting them leaves alpha's in place.
        with Client(authed.address, token=TOKEN_B) as b:
            assert {i.id for i in b.list_sessions()} >= {"alpha-secret-1"}
            b.delete_session("alpha-secret-1")
        assert caches(s, 3) == before[0]
        s.delete()
        s2.delete()


def test_list_sessions_shows_each_tenant_only_its_own(authed):
    made = {}
    for token, tenant in ((TOKEN_A, "alpha"), (TOKEN_B, "bravo"), (TOKEN_C, "charlie")):
        with Client(authed.address, token=token) as c:
            made[tenant] = {c.create_session(**GEOM, session_id=f"list-{tenant}-{i}").id
                            for i in range(3)}
            # A namesake in every tenant: each sees exactly one "list-shared".
            c.create_session(**GEOM, session_id="list-shared")
            made[tenant].add("list-shared")
    for token, tenant in ((TOKEN_A, "alpha"), (TOKEN_B, "bravo"), (TOKEN_C, "charlie")):
        with Client(authed.address, token=token) as c:
            listed = [i.id for i in c.list_sessions()]
            paged = [i.id for i in c.list_sessions(page_size=1)]
            assert set(listed) == made[tenant] and len(listed) == len(made[tenant])
            assert paged == listed
            for sid in made[tenant]:
                c.delete_session(sid)
            assert c.list_sessions() == []


def test_per_tenant_session_and_byte_limits(start_server):
    page = 64 * 1024
    srv = start_server(
        "--tenant-max-sessions", "2", "--tenant-max-bytes", str(4 * (page + 8192)),
        "--page-bytes", str(page),
        env={"Q8KV_AUTH_TOKENS": f"{TOKEN_A} alpha,{TOKEN_B} bravo"},
    )
    geom = Geo(num_layers=1, num_heads=8, num_kv_heads=8, head_dim=128, max_len=4096)
    # 2 * 8 * 128 = 2 KiB of codes per token: 32 tokens per 64 KiB page.
    with Client(srv.address, token=TOKEN_A) as a, Client(srv.address, token=TOKEN_B) as b:
        s1 = a.create_session(**geom)
        s2 = a.create_session(**geom)
        with pytest.raises(Q8KVError) as err:
            a.create_session(**geom)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "this tenant holds its maximum of 2 sessions" in err.value.message
        b1 = b.create_session(**geom)  # another tenant is not held back
        b.create_session(**geom)
        rng = np.random.default_rng(3)
        s1.append_and_attend(0, *qkv(rng, 96, geom))  # 3 pages
        s2.append_and_attend(0, *qkv(rng, 32, geom))  # the 4th
        with pytest.raises(Q8KVError) as err:
            s2.append_and_attend(0, *qkv(rng, 1, geom))  # would need a 5th
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant memory" in err.value.message and "holds 4 of its 4" in err.value.message
        assert s2.info().layer_lengths == [32]  # nothing appended
        b1.append_and_attend(0, *qkv(rng, 128, geom))  # bravo has its own 4 pages
        s1.delete()  # freeing pages and a session slot lets alpha go on
        s2.append_and_attend(0, *qkv(rng, 1, geom))
        a.create_session(**geom)


def test_removed_token_is_refused_after_sighup(start_server, tmp_path):
    path = tmp_path / "tokens"
    write_tokens(path, (TOKEN_A, "alpha"), (TOKEN_B, "bravo"))
    srv = start_server("--auth-tokens-file", str(path),
                       env={"Q8KV_AUTH_TOKENS": f"{TOKEN_C} charlie"})
    with Client(srv.address, token=TOKEN_A) as a, Client(srv.address, token=TOKEN_B) as b, \
            Client(srv.address, token=TOKEN_C) as c, Client(srv.address, token=TOKEN_D) as d:
        sa = a.create_session(**GEOM)
        b.create_session(**GEOM, session_id="bravo-kept")
        with pytest.raises(Q8KVError, match="^UNAUTHENTICATED"):
            d.list_sessions()

        write_tokens(path, (TOKEN_A, "alpha"), (TOKEN_D, "bravo"))  # rotate bravo's token
        srv.signal(signal.SIGHUP)
        wait_for_log(srv, "event=auth_reloaded")
        for call in (b.list_sessions, lambda: b.session_info("bravo-kept")):
            with pytest.raises(Q8KVError) as err:
                call()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert sa.info().id == sa.id  # another file token still works
        c.list_sessions()  # and the environment's
        assert [i.id for i in d.list_sessions()] == ["bravo-kept"]  # the new token: same tenant

        # A broken file keeps the table in force, and the error does not echo the line.
        path.write_text(f"{TOKEN_B}\n")
        srv.signal(signal.SIGHUP)
        logs = wait_for_log(srv, "event=auth_reload_failed")
        with pytest.raises(Q8KVError, match="^UNAUTHENTICATED"):
            b.list_sessions()
        d.list_sessions()
    assert TOKEN_B not in logs


def test_tokens_never_appear_in_logs(authed, tokens_file):
    # Every path above ran against this server at DEBUG: successes, refusals, errors.
    with Client(authed.address, token=TOKEN_A) as c, pytest.raises(Q8KVError):
        c.session_info("no-such")
    with grpc.insecure_channel(authed.address) as channel:
        every_rpc(stub(channel), bearer(TOKEN_D))
    logs = authed.logs()
    assert "event=config" in logs and "event=rpc_error" in logs
    for secret in SECRETS:
        assert secret not in logs
        assert re.sub(r"\d", "", secret) not in logs
