from protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillRequest(_message.Message):
    __slots__ = ("request", "transfer_id", "stream_first_token")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    request: _common_pb2.GenerateRequest
    transfer_id: int
    stream_first_token: bool
    def __init__(self, request: _Optional[_Union[_common_pb2.GenerateRequest, _Mapping]] = ..., transfer_id: _Optional[int] = ..., stream_first_token: _Optional[bool] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("request_id", "first_token_id", "cached_tokens", "transferred_bytes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRANSFERRED_BYTES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    first_token_id: int
    cached_tokens: int
    transferred_bytes: int
    def __init__(self, request_id: _Optional[str] = ..., first_token_id: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., transferred_bytes: _Optional[int] = ...) -> None: ...

class PrefillSessionRequest(_message.Message):
    __slots__ = ("submit", "abort")
    SUBMIT_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    submit: _containers.RepeatedCompositeFieldContainer[PrefillRequest]
    abort: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, submit: _Optional[_Iterable[_Union[PrefillRequest, _Mapping]]] = ..., abort: _Optional[_Iterable[str]] = ...) -> None: ...

class PrefillReply(_message.Message):
    __slots__ = ("request_id", "done", "error", "first")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    done: PrefillResponse
    error: _common_pb2.Error
    first: _common_pb2.StreamChunk
    def __init__(self, request_id: _Optional[str] = ..., done: _Optional[_Union[PrefillResponse, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.Error, _Mapping]] = ..., first: _Optional[_Union[_common_pb2.StreamChunk, _Mapping]] = ...) -> None: ...

class PrefillSessionResponse(_message.Message):
    __slots__ = ("replies",)
    REPLIES_FIELD_NUMBER: _ClassVar[int]
    replies: _containers.RepeatedCompositeFieldContainer[PrefillReply]
    def __init__(self, replies: _Optional[_Iterable[_Union[PrefillReply, _Mapping]]] = ...) -> None: ...

class AttachDestinationRequest(_message.Message):
    __slots__ = ("request_id", "transfer_id", "decode_endpoint", "session_id", "page_ids", "k_base_addrs", "v_base_addrs", "layout", "dp_rank", "num_pages")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    DECODE_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    K_BASE_ADDRS_FIELD_NUMBER: _ClassVar[int]
    V_BASE_ADDRS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    transfer_id: int
    decode_endpoint: str
    session_id: str
    page_ids: _containers.RepeatedScalarFieldContainer[int]
    k_base_addrs: _containers.RepeatedScalarFieldContainer[int]
    v_base_addrs: _containers.RepeatedScalarFieldContainer[int]
    layout: _common_pb2.KVLayout
    dp_rank: int
    num_pages: int
    def __init__(self, request_id: _Optional[str] = ..., transfer_id: _Optional[int] = ..., decode_endpoint: _Optional[str] = ..., session_id: _Optional[str] = ..., page_ids: _Optional[_Iterable[int]] = ..., k_base_addrs: _Optional[_Iterable[int]] = ..., v_base_addrs: _Optional[_Iterable[int]] = ..., layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., dp_rank: _Optional[int] = ..., num_pages: _Optional[int] = ...) -> None: ...

class AttachDestinationResponse(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class RevokeDestinationRequest(_message.Message):
    __slots__ = ("request_id", "transfer_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    transfer_id: int
    def __init__(self, request_id: _Optional[str] = ..., transfer_id: _Optional[int] = ...) -> None: ...

class RevokeDestinationResponse(_message.Message):
    __slots__ = ("request_id", "idle")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IDLE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    idle: bool
    def __init__(self, request_id: _Optional[str] = ..., idle: _Optional[bool] = ...) -> None: ...
