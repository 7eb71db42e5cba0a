from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FailureClass(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAILURE_CLASS_UNSPECIFIED: _ClassVar[FailureClass]
    INFRASTRUCTURE: _ClassVar[FailureClass]
    USER: _ClassVar[FailureClass]
FAILURE_CLASS_UNSPECIFIED: FailureClass
INFRASTRUCTURE: FailureClass
USER: FailureClass

class WorkerId(_message.Message):
    __slots__ = ("job_id", "attempt", "rank", "incarnation")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    rank: int
    incarnation: int
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., rank: _Optional[int] = ..., incarnation: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("worker", "host", "pid")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerId
    host: str
    pid: int
    def __init__(self, worker: _Optional[_Union[WorkerId, _Mapping]] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("accepted", "reason", "world_size", "job_spec_json", "start_step", "checkpoint_dir", "resume_from", "incarnation")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    JOB_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_DIR_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    world_size: int
    job_spec_json: str
    start_step: int
    checkpoint_dir: str
    resume_from: str
    incarnation: int
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., world_size: _Optional[int] = ..., job_spec_json: _Optional[str] = ..., start_step: _Optional[int] = ..., checkpoint_dir: _Optional[str] = ..., resume_from: _Optional[str] = ..., incarnation: _Optional[int] = ...) -> None: ...

class World(_message.Message):
    __slots__ = ("epoch", "members", "store_prefix", "joining", "reason", "checkpoint", "start_step")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    STORE_PREFIX_FIELD_NUMBER: _ClassVar[int]
    JOINING_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    members: _containers.RepeatedScalarFieldContainer[int]
    store_prefix: str
    joining: _containers.RepeatedScalarFieldContainer[int]
    reason: str
    checkpoint: str
    start_step: int
    def __init__(self, epoch: _Optional[int] = ..., members: _Optional[_Iterable[int]] = ..., store_prefix: _Optional[str] = ..., joining: _Optional[_Iterable[int]] = ..., reason: _Optional[str] = ..., checkpoint: _Optional[str] = ..., start_step: _Optional[int] = ...) -> None: ...

class PlanRequest(_message.Message):
    __slots__ = ("worker", "from_step", "world_epoch", "formed")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    WORLD_EPOCH_FIELD_NUMBER: _ClassVar[int]
    FORMED_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerId
    from_step: int
    world_epoch: int
    formed: bool
    def __init__(self, worker: _Optional[_Union[WorkerId, _Mapping]] = ..., from_step: _Optional[int] = ..., world_epoch: _Optional[int] = ..., formed: _Optional[bool] = ...) -> None: ...

class PlanMessage(_message.Message):
    __slots__ = ("step", "plan_json", "sample_ids", "data_epoch", "data_index", "checkpoint", "stop", "traceparent", "predicted_step_s", "world", "world_epoch")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PLAN_JSON_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    DATA_EPOCH_FIELD_NUMBER: _ClassVar[int]
    DATA_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_STEP_S_FIELD_NUMBER: _ClassVar[int]
    WORLD_FIELD_NUMBER: _ClassVar[int]
    WORLD_EPOCH_FIELD_NUMBER: _ClassVar[int]
    step: int
    plan_json: str
    sample_ids: _containers.RepeatedScalarFieldContainer[int]
    data_epoch: int
    data_index: int
    checkpoint: bool
    stop: bool
    traceparent: str
    predicted_step_s: float
    world: World
    world_epoch: int
    def __init__(self, step: _Optional[int] = ..., plan_json: _Optional[str] = ..., sample_ids: _Optional[_Iterable[int]] = ..., data_epoch: _Optional[int] = ..., data_index: _Optional[int] = ..., checkpoint: _Optional[bool] = ..., stop: _Optional[bool] = ..., traceparent: _Optional[str] = ..., predicted_step_s: _Optional[float] = ..., world: _Optional[_Union[World, _Mapping]] = ..., world_epoch: _Optional[int] = ...) -> None: ...

class StepReport(_message.Message):
    __slots__ = ("worker", "step", "loss", "num_predictions", "tokens", "micro_batch_times_s", "peak_memory_bytes", "step_time_s", "checkpoint_path", "world_epoch", "predicted_step_s", "plan_groups", "micro_batch_busy_s")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_TIMES_S_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_S_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_PATH_FIELD_NUMBER: _ClassVar[int]
    WORLD_EPOCH_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_STEP_S_FIELD_NUMBER: _ClassVar[int]
    PLAN_GROUPS_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_BUSY_S_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerId
    step: int
    loss: float
    num_predictions: int
    tokens: int
    micro_batch_times_s: _containers.RepeatedScalarFieldContainer[float]
    peak_memory_bytes: int
    step_time_s: float
    checkpoint_path: str
    world_epoch: int
    predicted_step_s: float
    plan_groups: str
    micro_batch_busy_s: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, worker: _Optional[_Union[WorkerId, _Mapping]] = ..., step: _Optional[int] = ..., loss: _Optional[float] = ..., num_predictions: _Optional[int] = ..., tokens: _Optional[int] = ..., micro_batch_times_s: _Optional[_Iterable[float]] = ..., peak_memory_bytes: _Optional[int] = ..., step_time_s: _Optional[float] = ..., checkpoint_path: _Optional[str] = ..., world_epoch: _Optional[int] = ..., predicted_step_s: _Optional[float] = ..., plan_groups: _Optional[str] = ..., micro_batch_busy_s: _Optional[_Iterable[float]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("accepted", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker", "step", "progress", "syncing", "position")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    SYNCING_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerId
    step: int
    progress: int
    syncing: bool
    position: StepPosition
    def __init__(self, worker: _Optional[_Union[WorkerId, _Mapping]] = ..., step: _Optional[int] = ..., progress: _Optional[int] = ..., syncing: _Optional[bool] = ..., position: _Optional[_Union[StepPosition, _Mapping]] = ...) -> None: ...

class StepPosition(_message.Message):
    __slots__ = ("step", "micro_batch", "ring", "layer", "phase", "ring_hop", "waiting")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    RING_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    RING_HOP_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    step: int
    micro_batch: int
    ring: _containers.RepeatedScalarFieldContainer[int]
    layer: int
    phase: str
    ring_hop: int
    waiting: bool
    def __init__(self, step: _Optional[int] = ..., micro_batch: _Optional[int] = ..., ring: _Optional[_Iterable[int]] = ..., layer: _Optional[int] = ..., phase: _Optional[str] = ..., ring_hop: _Optional[int] = ..., waiting: _Optional[bool] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("accepted", "stop", "reason", "world_epoch", "broken_below")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WORLD_EPOCH_FIELD_NUMBER: _ClassVar[int]
    BROKEN_BELOW_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    stop: bool
    reason: str
    world_epoch: int
    broken_below: int
    def __init__(self, accepted: _Optional[bool] = ..., stop: _Optional[bool] = ..., reason: _Optional[str] = ..., world_epoch: _Optional[int] = ..., broken_below: _Optional[int] = ...) -> None: ...

class FailureReport(_message.Message):
    __slots__ = ("worker", "step", "error", "lost_ranks", "recoverable", "cannot_replan", "world_epoch", "failure_class", "failed_rank")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LOST_RANKS_FIELD_NUMBER: _ClassVar[int]
    RECOVERABLE_FIELD_NUMBER: _ClassVar[int]
    CANNOT_REPLAN_FIELD_NUMBER: _ClassVar[int]
    WORLD_EPOCH_FIELD_NUMBER: _ClassVar[int]
    FAILURE_CLASS_FIELD_NUMBER: _ClassVar[int]
    FAILED_RANK_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerId
    step: int
    error: str
    lost_ranks: _containers.RepeatedScalarFieldContainer[int]
    recoverable: bool
    cannot_replan: bool
    world_epoch: int
    failure_class: FailureClass
    failed_rank: int
    def __init__(self, worker: _Optional[_Union[WorkerId, _Mapping]] = ..., step: _Optional[int] = ..., error: _Optional[str] = ..., lost_ranks: _Optional[_Iterable[int]] = ..., recoverable: _Optional[bool] = ..., cannot_replan: _Optional[bool] = ..., world_epoch: _Optional[int] = ..., failure_class: _Optional[_Union[FailureClass, str]] = ..., failed_rank: _Optional[int] = ...) -> None: ...

class LogEntry(_message.Message):
    __slots__ = ("at", "level", "text")
    AT_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    at: float
    level: str
    text: str
    def __init__(self, at: _Optional[float] = ..., level: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class LogBatch(_message.Message):
    __slots__ = ("worker", "entries")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerId
    entries: _containers.RepeatedCompositeFieldContainer[LogEntry]
    def __init__(self, worker: _Optional[_Union[WorkerId, _Mapping]] = ..., entries: _Optional[_Iterable[_Union[LogEntry, _Mapping]]] = ...) -> None: ...
