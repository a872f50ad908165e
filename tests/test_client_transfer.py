"""Client unit tests of export_session / import_session against fake stubs (no server):
metadata, deadline and routing header on both calls, chunk checking, error mapping."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from harness.fakes import FakeRpcError, answer

from q8kv.client import AsyncClient, Client, Q8KVError
from q8kv.client import messages as m
from q8kv.v1 import kvcache_pb2 as pb


def chunks(sid="moved"):
    return [
        pb.SessionChunk(header=pb.SessionHeader(format_version=1, session_id=sid)),
        pb.SessionChunk(tokens=pb.TokenChunk(layer=0, start=0, count=1, codes=b"\1" * 64)),
        pb.SessionChunk(trailer=pb.SessionTrailer(sha256=b"\0" * 32)),
    ]


class FakeStub:
    """ExportSession yields ``chunks()`` (or fails mid-stream for id 'broken');
    ImportSession records what it was sent and answers with the header's id."""

    def __init__(self, log, is_async=False):
        self.log, self.is_async = log, is_async

    def ExportSession(self, request, **kwargs):
        self.log.append(("ExportSession", request, kwargs))

        def gen():
            yield from chunks(request.session_id)[:1]
            if request.session_id == "broken":
                raise FakeRpcError(grpc.StatusCode.NOT_FOUND, "session_id: no session 'broken'")
            yield from chunks(request.session_id)[1:]

        if not self.is_async:
            return gen()

        async def agen():
            for chunk in gen():
                yield chunk

        return agen()

    def ImportSession(self, request_iterator, **kwargs):
        sent = list(request_iterator)
        self.log.append(("ImportSession", sent, kwargs))
        header = sent[0].header
        if header.session_id == "taken":
            result = FakeRpcError(grpc.StatusCode.ALREADY_EXISTS, "session_id: 'taken' exists")
        else:
            result = pb.ImportSessionResponse(session=pb.SessionInfo(session_id=header.session_id))
        return answer(result, self.is_async)


def check_log(log, timeout):
    for name, request, kwargs in log:
        assert kwargs["timeout"] == timeout
        metadata = dict(kwargs["metadata"])
        assert metadata["authorization"] == "Bearer secret-token"
        sid = request.session_id if name == "ExportSession" else request[0].header.session_id
        assert metadata["x-session-id"] == sid


def test_sync_export_and_import():
    log = []
    with Client("127.0.0.1:1", timeout=4.0, token="secret-token") as c:
        c._stub = FakeStub(log)
        got = c.export_session("moved")
        assert got == chunks("moved")
        assert c.session("moved").export() == chunks("moved")
        handle = c.import_session(iter(got))  # any iterable, a generator included
        assert handle.id == "moved" and handle.client is c
        with pytest.raises(Q8KVError) as err:
            c.export_session("broken")
        assert err.value.code is grpc.StatusCode.NOT_FOUND
        with pytest.raises(Q8KVError) as err:
            c.import_session(chunks("taken"))
        assert err.value.code is grpc.StatusCode.ALREADY_EXISTS
    assert [n for n, _, _ in log] == ["ExportSession"] * 2 + ["ImportSession"] + [
        "ExportSession", "ImportSession"
    ]
    assert log[2][1] == chunks("moved")  # every chunk sent, in order
    check_log(log, 4.0)


def test_async_export_and_import():
    async def main():
        log = []
        async with AsyncClient("127.0.0.1:1", timeout=2.0, token="secret-token") as c:
            c._stub = FakeStub(log, is_async=True)
            got = await c.export_session(c.session("moved"))
            assert got == chunks("moved")
            assert await c.session("moved").export() == got
            handle = await c.import_session(got)
            assert handle.id == "moved"
            with pytest.raises(Q8KVError, match="^NOT_FOUND"):
                await c.export_session("broken")
            with pytest.raises(Q8KVError, match="^ALREADY_EXISTS"):
                await c.import_session(chunks("taken"))
        return log

    log = asyncio.run(main())
    assert len(log) == 5
    check_log(log, 2.0)


@pytest.mark.parametrize(
    "bad, pattern",
    [
        ([], r"^INVALID_ARGUMENT: chunks: expected a header"),
        ([b"raw"], r"^INVALID_ARGUMENT: chunks\[0\]: expected a SessionChunk, got bytes"),
        ([*chunks(), "x"], r"chunks\[3\]: expected a SessionChunk, got str"),
    ],
)
def test_import_rejects_what_is_not_chunks_before_sending(bad, pattern):
    log = []
    with Client("127.0.0.1:1") as c:
        c._stub = FakeStub(log)
        with pytest.raises(Q8KVError, match=pattern):
            c.import_session(bad)
    assert log == []


def test_import_chunks_routing_id():
    sent, sid = m.import_chunks(chunks("abc"))
    assert sid == "abc" and len(sent) == 3
    _, sid = m.import_chunks(chunks("abc")[1:])  # no header first: the server will refuse
    assert sid is None
    _, sid = m.import_chunks(chunks(""))  # empty id in the header: no routing header
    assert sid is None


def test_imported_session_id_must_be_present():
    with pytest.raises(Q8KVError, match="^INTERNAL"):
        m.imported_session_id(pb.ImportSessionResponse())
