from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Geometry(_message.Message):
    __slots__ = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "max_len")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    MAX_LEN_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_len: int
    def __init__(self, num_layers: _Optional[int] = ..., num_heads: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., max_len: _Optional[int] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "geometry", "softmax_scale", "layer_lengths", "cache_bytes", "reserved_bytes", "ttl_seconds", "created_at", "last_used_at")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    SOFTMAX_SCALE_FIELD_NUMBER: _ClassVar[int]
    LAYER_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_AT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    geometry: Geometry
    softmax_scale: float
    layer_lengths: _containers.RepeatedScalarFieldContainer[int]
    cache_bytes: int
    reserved_bytes: int
    ttl_seconds: float
    created_at: float
    last_used_at: float
    def __init__(self, session_id: _Optional[str] = ..., geometry: _Optional[_Union[Geometry, _Mapping]] = ..., softmax_scale: _Optional[float] = ..., layer_lengths: _Optional[_Iterable[int]] = ..., cache_bytes: _Optional[int] = ..., reserved_bytes: _Optional[int] = ..., ttl_seconds: _Optional[float] = ..., created_at: _Optional[float] = ..., last_used_at: _Optional[float] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("session_id", "geometry", "ttl_seconds", "softmax_scale")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SOFTMAX_SCALE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    geometry: Geometry
    ttl_seconds: float
    softmax_scale: float
    def __init__(self, session_id: _Optional[str] = ..., geometry: _Optional[_Union[Geometry, _Mapping]] = ..., ttl_seconds: _Optional[float] = ..., softmax_scale: _Optional[float] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    next_page_token: str
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ("freed_bytes",)
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    freed_bytes: int
    def __init__(self, freed_bytes: _Optional[int] = ...) -> None: ...

class TruncateSessionRequest(_message.Message):
    __slots__ = ("session_id", "length")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    length: int
    def __init__(self, session_id: _Optional[str] = ..., length: _Optional[int] = ...) -> None: ...

class TruncateSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ...) -> None: ...

class ForkSessionRequest(_message.Message):
    __slots__ = ("source_session_id", "session_id", "length", "ttl_seconds")
    SOURCE_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    source_session_id: str
    session_id: str
    length: int
    ttl_seconds: float
    def __init__(self, source_session_id: _Optional[str] = ..., session_id: _Optional[str] = ..., length: _Optional[int] = ..., ttl_seconds: _Optional[float] = ...) -> None: ...

class ForkSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ...) -> None: ...

class AttendItem(_message.Message):
    __slots__ = ("session_id", "layer", "q", "k", "v", "expected_length")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    V_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    layer: int
    q: Tensor
    k: Tensor
    v: Tensor
    expected_length: int
    def __init__(self, session_id: _Optional[str] = ..., layer: _Optional[int] = ..., q: _Optional[_Union[Tensor, _Mapping]] = ..., k: _Optional[_Union[Tensor, _Mapping]] = ..., v: _Optional[_Union[Tensor, _Mapping]] = ..., expected_length: _Optional[int] = ...) -> None: ...

class AttendResult(_message.Message):
    __slots__ = ("output", "length")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    output: Tensor
    length: int
    def __init__(self, output: _Optional[_Union[Tensor, _Mapping]] = ..., length: _Optional[int] = ...) -> None: ...

class AppendAndAttendRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[AttendItem]
    def __init__(self, items: _Optional[_Iterable[_Union[AttendItem, _Mapping]]] = ...) -> None: ...

class AppendAndAttendResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[AttendResult]
    def __init__(self, results: _Optional[_Iterable[_Union[AttendResult, _Mapping]]] = ...) -> None: ...

class AttendBatchRequest(_message.Message):
    __slots__ = ("session_ids", "layer", "q", "k", "v", "expected_lengths")
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    V_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    layer: int
    q: Tensor
    k: Tensor
    v: Tensor
    expected_lengths: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_ids: _Optional[_Iterable[str]] = ..., layer: _Optional[int] = ..., q: _Optional[_Union[Tensor, _Mapping]] = ..., k: _Optional[_Union[Tensor, _Mapping]] = ..., v: _Optional[_Union[Tensor, _Mapping]] = ..., expected_lengths: _Optional[_Iterable[int]] = ...) -> None: ...

class AttendBatchResponse(_message.Message):
    __slots__ = ("output", "lengths")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    output: Tensor
    lengths: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, output: _Optional[_Union[Tensor, _Mapping]] = ..., lengths: _Optional[_Iterable[int]] = ...) -> None: ...

class AppendAndAttendStreamRequest(_message.Message):
    __slots__ = ("request_id", "items", "batch")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    items: _containers.RepeatedCompositeFieldContainer[AttendItem]
    batch: AttendBatchRequest
    def __init__(self, request_id: _Optional[int] = ..., items: _Optional[_Iterable[_Union[AttendItem, _Mapping]]] = ..., batch: _Optional[_Union[AttendBatchRequest, _Mapping]] = ...) -> None: ...

class AppendAndAttendStreamResponse(_message.Message):
    __slots__ = ("request_id", "results", "error_code", "error_message", "batch")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    results: _containers.RepeatedCompositeFieldContainer[AttendResult]
    error_code: int
    error_message: str
    batch: AttendBatchResponse
    def __init__(self, request_id: _Optional[int] = ..., results: _Optional[_Iterable[_Union[AttendResult, _Mapping]]] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ..., batch: _Optional[_Union[AttendBatchResponse, _Mapping]] = ...) -> None: ...

class DequantizeRequest(_message.Message):
    __slots__ = ("session_id", "layer", "start", "end")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    layer: int
    start: int
    end: int
    def __init__(self, session_id: _Optional[str] = ..., layer: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class DequantizeResponse(_message.Message):
    __slots__ = ("k", "v", "length")
    K_FIELD_NUMBER: _ClassVar[int]
    V_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    k: Tensor
    v: Tensor
    length: int
    def __init__(self, k: _Optional[_Union[Tensor, _Mapping]] = ..., v: _Optional[_Union[Tensor, _Mapping]] = ..., length: _Optional[int] = ...) -> None: ...

class ExportSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionChunk(_message.Message):
    __slots__ = ("header", "tokens", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: SessionHeader
    tokens: TokenChunk
    trailer: SessionTrailer
    def __init__(self, header: _Optional[_Union[SessionHeader, _Mapping]] = ..., tokens: _Optional[_Union[TokenChunk, _Mapping]] = ..., trailer: _Optional[_Union[SessionTrailer, _Mapping]] = ...) -> None: ...

class SessionHeader(_message.Message):
    __slots__ = ("format_version", "session_id", "geometry", "softmax_scale", "ttl_seconds", "layer_lengths", "tenant")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    SOFTMAX_SCALE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAYER_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    session_id: str
    geometry: Geometry
    softmax_scale: float
    ttl_seconds: float
    layer_lengths: _containers.RepeatedScalarFieldContainer[int]
    tenant: str
    def __init__(self, format_version: _Optional[int] = ..., session_id: _Optional[str] = ..., geometry: _Optional[_Union[Geometry, _Mapping]] = ..., softmax_scale: _Optional[float] = ..., ttl_seconds: _Optional[float] = ..., layer_lengths: _Optional[_Iterable[int]] = ..., tenant: _Optional[str] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("layer", "start", "count", "codes", "scales")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    layer: int
    start: int
    count: int
    codes: bytes
    scales: bytes
    def __init__(self, layer: _Optional[int] = ..., start: _Optional[int] = ..., count: _Optional[int] = ..., codes: _Optional[bytes] = ..., scales: _Optional[bytes] = ...) -> None: ...

class SessionTrailer(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: bytes
    def __init__(self, sha256: _Optional[bytes] = ...) -> None: ...

class ImportSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ...) -> None: ...
