import datetime

from baton_client._pb.baton.v1 import api_pb2 as _api_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ArtifactUpload(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ArtifactHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[ArtifactHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ArtifactHeader(_message.Message):
    __slots__ = ("attempt", "path", "size")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    attempt: AttemptRef
    path: str
    size: int
    def __init__(self, attempt: _Optional[_Union[AttemptRef, _Mapping]] = ..., path: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class FetchInputsRequest(_message.Message):
    __slots__ = ("attempt", "from_step", "patterns")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    PATTERNS_FIELD_NUMBER: _ClassVar[int]
    attempt: AttemptRef
    from_step: str
    patterns: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, attempt: _Optional[_Union[AttemptRef, _Mapping]] = ..., from_step: _Optional[str] = ..., patterns: _Optional[_Iterable[str]] = ...) -> None: ...

class StepInputs(_message.Message):
    __slots__ = ("from_step", "patterns")
    FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    PATTERNS_FIELD_NUMBER: _ClassVar[int]
    from_step: str
    patterns: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, from_step: _Optional[str] = ..., patterns: _Optional[_Iterable[str]] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("agent_id", "name")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    name: str
    def __init__(self, agent_id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("credential", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    credential: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, credential: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "heartbeat", "started", "output", "finished")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    heartbeat: Heartbeat
    started: AttemptStarted
    output: AttemptOutput
    finished: AttemptFinished
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., started: _Optional[_Union[AttemptStarted, _Mapping]] = ..., output: _Optional[_Union[AttemptOutput, _Mapping]] = ..., finished: _Optional[_Union[AttemptFinished, _Mapping]] = ...) -> None: ...

class ControllerMessage(_message.Message):
    __slots__ = ("welcome", "assign", "cancel", "ack", "drain", "pong")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ASSIGN_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    PONG_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    assign: Assign
    cancel: Cancel
    ack: Ack
    drain: Drain
    pong: Pong
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., assign: _Optional[_Union[Assign, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., drain: _Optional[_Union[Drain, _Mapping]] = ..., pong: _Optional[_Union[Pong, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("agent_id", "name", "version", "labels", "tools", "slots", "running", "unacked", "queued")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    UNACKED_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    name: str
    version: str
    labels: _containers.ScalarMap[str, str]
    tools: _containers.RepeatedCompositeFieldContainer[_api_pb2.Tool]
    slots: int
    running: _containers.RepeatedCompositeFieldContainer[AttemptRef]
    unacked: _containers.RepeatedCompositeFieldContainer[AttemptFinished]
    queued: _containers.RepeatedCompositeFieldContainer[AttemptRef]
    def __init__(self, agent_id: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., tools: _Optional[_Iterable[_Union[_api_pb2.Tool, _Mapping]]] = ..., slots: _Optional[int] = ..., running: _Optional[_Iterable[_Union[AttemptRef, _Mapping]]] = ..., unacked: _Optional[_Iterable[_Union[AttemptFinished, _Mapping]]] = ..., queued: _Optional[_Iterable[_Union[AttemptRef, _Mapping]]] = ...) -> None: ...

class AttemptRef(_message.Message):
    __slots__ = ("attempt_id", "lease_token", "run_id", "step_id")
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    attempt_id: str
    lease_token: str
    run_id: str
    step_id: str
    def __init__(self, attempt_id: _Optional[str] = ..., lease_token: _Optional[str] = ..., run_id: _Optional[str] = ..., step_id: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("running", "free_slots", "sent_ms")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    FREE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    SENT_MS_FIELD_NUMBER: _ClassVar[int]
    running: _containers.RepeatedCompositeFieldContainer[AttemptRef]
    free_slots: int
    sent_ms: int
    def __init__(self, running: _Optional[_Iterable[_Union[AttemptRef, _Mapping]]] = ..., free_slots: _Optional[int] = ..., sent_ms: _Optional[int] = ...) -> None: ...

class AttemptStarted(_message.Message):
    __slots__ = ("attempt", "pid")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    attempt: AttemptRef
    pid: int
    def __init__(self, attempt: _Optional[_Union[AttemptRef, _Mapping]] = ..., pid: _Optional[int] = ...) -> None: ...

class AttemptOutput(_message.Message):
    __slots__ = ("attempt", "offset", "data")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    attempt: AttemptRef
    offset: int
    data: bytes
    def __init__(self, attempt: _Optional[_Union[AttemptRef, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class AttemptFinished(_message.Message):
    __slots__ = ("attempt", "outcome", "exit_code", "failure_class", "error", "result", "output_tail", "duration", "output_bytes", "artifacts")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    FAILURE_CLASS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TAIL_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    attempt: AttemptRef
    outcome: _api_pb2.Outcome
    exit_code: int
    failure_class: _api_pb2.FailureClass
    error: str
    result: _struct_pb2.Value
    output_tail: str
    duration: _duration_pb2.Duration
    output_bytes: int
    artifacts: _containers.RepeatedCompositeFieldContainer[_api_pb2.ArtifactInfo]
    def __init__(self, attempt: _Optional[_Union[AttemptRef, _Mapping]] = ..., outcome: _Optional[_Union[_api_pb2.Outcome, str]] = ..., exit_code: _Optional[int] = ..., failure_class: _Optional[_Union[_api_pb2.FailureClass, str]] = ..., error: _Optional[str] = ..., result: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., output_tail: _Optional[str] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., output_bytes: _Optional[int] = ..., artifacts: _Optional[_Iterable[_Union[_api_pb2.ArtifactInfo, _Mapping]]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("session_id", "heartbeat_interval", "lease_timeout", "adopted", "abandon", "stop_after", "fence_grace", "idle_heartbeat_interval")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    LEASE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    ADOPTED_FIELD_NUMBER: _ClassVar[int]
    ABANDON_FIELD_NUMBER: _ClassVar[int]
    STOP_AFTER_FIELD_NUMBER: _ClassVar[int]
    FENCE_GRACE_FIELD_NUMBER: _ClassVar[int]
    IDLE_HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    heartbeat_interval: _duration_pb2.Duration
    lease_timeout: _duration_pb2.Duration
    adopted: _containers.RepeatedScalarFieldContainer[str]
    abandon: _containers.RepeatedScalarFieldContainer[str]
    stop_after: _duration_pb2.Duration
    fence_grace: _duration_pb2.Duration
    idle_heartbeat_interval: _duration_pb2.Duration
    def __init__(self, session_id: _Optional[str] = ..., heartbeat_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., lease_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., adopted: _Optional[_Iterable[str]] = ..., abandon: _Optional[_Iterable[str]] = ..., stop_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., fence_grace: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., idle_heartbeat_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ExecutionRequest(_message.Message):
    __slots__ = ("tool", "input", "env", "timeout", "kill_grace", "max_output_bytes", "redact", "traceparent", "render", "values", "inputs", "artifacts", "optional_artifacts")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TOOL_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    KILL_GRACE_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    REDACT_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    RENDER_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    OPTIONAL_ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    tool: str
    input: _struct_pb2.Struct
    env: _containers.ScalarMap[str, str]
    timeout: _duration_pb2.Duration
    kill_grace: _duration_pb2.Duration
    max_output_bytes: int
    redact: _containers.RepeatedScalarFieldContainer[str]
    traceparent: str
    render: bool
    values: _struct_pb2.Struct
    inputs: _containers.RepeatedCompositeFieldContainer[StepInputs]
    artifacts: _containers.RepeatedScalarFieldContainer[str]
    optional_artifacts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tool: _Optional[str] = ..., input: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., env: _Optional[_Mapping[str, str]] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., kill_grace: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_output_bytes: _Optional[int] = ..., redact: _Optional[_Iterable[str]] = ..., traceparent: _Optional[str] = ..., render: _Optional[bool] = ..., values: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., inputs: _Optional[_Iterable[_Union[StepInputs, _Mapping]]] = ..., artifacts: _Optional[_Iterable[str]] = ..., optional_artifacts: _Optional[_Iterable[str]] = ...) -> None: ...

class Assign(_message.Message):
    __slots__ = ("attempt", "number", "request", "after")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    attempt: AttemptRef
    number: int
    request: ExecutionRequest
    after: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, attempt: _Optional[_Union[AttemptRef, _Mapping]] = ..., number: _Optional[int] = ..., request: _Optional[_Union[ExecutionRequest, _Mapping]] = ..., after: _Optional[_Iterable[str]] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("attempt_id", "reason")
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    attempt_id: str
    reason: str
    def __init__(self, attempt_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("attempt_id", "accepted")
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    attempt_id: str
    accepted: bool
    def __init__(self, attempt_id: _Optional[str] = ..., accepted: _Optional[bool] = ...) -> None: ...

class Drain(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Pong(_message.Message):
    __slots__ = ("heartbeat_sent_ms",)
    HEARTBEAT_SENT_MS_FIELD_NUMBER: _ClassVar[int]
    heartbeat_sent_ms: int
    def __init__(self, heartbeat_sent_ms: _Optional[int] = ...) -> None: ...
