from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Modulation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODULATION_UNSPECIFIED: _ClassVar[Modulation]
    QPSK: _ClassVar[Modulation]
    QAM16: _ClassVar[Modulation]
    QAM64: _ClassVar[Modulation]
MODULATION_UNSPECIFIED: Modulation
QPSK: Modulation
QAM16: Modulation
QAM64: Modulation

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DTYPE_UNSPECIFIED: _ClassVar[Tensor.DType]
        FLOAT32: _ClassVar[Tensor.DType]
        UINT8: _ClassVar[Tensor.DType]
    DTYPE_UNSPECIFIED: Tensor.DType
    FLOAT32: Tensor.DType
    UINT8: Tensor.DType
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: Tensor.DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[Tensor.DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Slot(_message.Message):
    __slots__ = ("slot_id", "context", "grid", "pilots", "data_mask", "modulation", "noise_variance")
    SLOT_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    PILOTS_FIELD_NUMBER: _ClassVar[int]
    DATA_MASK_FIELD_NUMBER: _ClassVar[int]
    MODULATION_FIELD_NUMBER: _ClassVar[int]
    NOISE_VARIANCE_FIELD_NUMBER: _ClassVar[int]
    slot_id: str
    context: str
    grid: Tensor
    pilots: Tensor
    data_mask: Tensor
    modulation: Modulation
    noise_variance: float
    def __init__(self, slot_id: _Optional[str] = ..., context: _Optional[str] = ..., grid: _Optional[_Union[Tensor, _Mapping]] = ..., pilots: _Optional[_Union[Tensor, _Mapping]] = ..., data_mask: _Optional[_Union[Tensor, _Mapping]] = ..., modulation: _Optional[_Union[Modulation, str]] = ..., noise_variance: _Optional[float] = ...) -> None: ...

class SlotResult(_message.Message):
    __slots__ = ("slot_id", "llrs", "hard_bits", "model_version", "server_latency_seconds")
    SLOT_ID_FIELD_NUMBER: _ClassVar[int]
    LLRS_FIELD_NUMBER: _ClassVar[int]
    HARD_BITS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_LATENCY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    slot_id: str
    llrs: Tensor
    hard_bits: Tensor
    model_version: str
    server_latency_seconds: float
    def __init__(self, slot_id: _Optional[str] = ..., llrs: _Optional[_Union[Tensor, _Mapping]] = ..., hard_bits: _Optional[_Union[Tensor, _Mapping]] = ..., model_version: _Optional[str] = ..., server_latency_seconds: _Optional[float] = ...) -> None: ...

class DetectRequest(_message.Message):
    __slots__ = ("slots", "return_hard_bits")
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    RETURN_HARD_BITS_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedCompositeFieldContainer[Slot]
    return_hard_bits: bool
    def __init__(self, slots: _Optional[_Iterable[_Union[Slot, _Mapping]]] = ..., return_hard_bits: _Optional[bool] = ...) -> None: ...

class DetectResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SlotResult]
    def __init__(self, results: _Optional[_Iterable[_Union[SlotResult, _Mapping]]] = ...) -> None: ...

class StreamDetectRequest(_message.Message):
    __slots__ = ("slot", "return_hard_bits")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    RETURN_HARD_BITS_FIELD_NUMBER: _ClassVar[int]
    slot: Slot
    return_hard_bits: bool
    def __init__(self, slot: _Optional[_Union[Slot, _Mapping]] = ..., return_hard_bits: _Optional[bool] = ...) -> None: ...

class Feedback(_message.Message):
    __slots__ = ("slot_id", "genie_bits", "transport_block", "reference_genie_errors", "reference_ls_lmmse_errors")
    SLOT_ID_FIELD_NUMBER: _ClassVar[int]
    GENIE_BITS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_BLOCK_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_GENIE_ERRORS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_LS_LMMSE_ERRORS_FIELD_NUMBER: _ClassVar[int]
    slot_id: str
    genie_bits: Tensor
    transport_block: TransportBlockResult
    reference_genie_errors: int
    reference_ls_lmmse_errors: int
    def __init__(self, slot_id: _Optional[str] = ..., genie_bits: _Optional[_Union[Tensor, _Mapping]] = ..., transport_block: _Optional[_Union[TransportBlockResult, _Mapping]] = ..., reference_genie_errors: _Optional[int] = ..., reference_ls_lmmse_errors: _Optional[int] = ...) -> None: ...

class TransportBlockResult(_message.Message):
    __slots__ = ("crc_ok", "coded_bits")
    CRC_OK_FIELD_NUMBER: _ClassVar[int]
    CODED_BITS_FIELD_NUMBER: _ClassVar[int]
    crc_ok: bool
    coded_bits: Tensor
    def __init__(self, crc_ok: _Optional[bool] = ..., coded_bits: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ReportFeedbackRequest(_message.Message):
    __slots__ = ("feedback",)
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    feedback: _containers.RepeatedCompositeFieldContainer[Feedback]
    def __init__(self, feedback: _Optional[_Iterable[_Union[Feedback, _Mapping]]] = ...) -> None: ...

class ReportFeedbackResponse(_message.Message):
    __slots__ = ("accepted", "unknown_slots", "errors")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_SLOTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    unknown_slots: int
    errors: _containers.RepeatedCompositeFieldContainer[SlotErrors]
    def __init__(self, accepted: _Optional[int] = ..., unknown_slots: _Optional[int] = ..., errors: _Optional[_Iterable[_Union[SlotErrors, _Mapping]]] = ...) -> None: ...

class SlotErrors(_message.Message):
    __slots__ = ("slot_id", "context", "bit_errors", "num_bits", "model_version")
    SLOT_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    BIT_ERRORS_FIELD_NUMBER: _ClassVar[int]
    NUM_BITS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    slot_id: str
    context: str
    bit_errors: int
    num_bits: int
    model_version: str
    def __init__(self, slot_id: _Optional[str] = ..., context: _Optional[str] = ..., bit_errors: _Optional[int] = ..., num_bits: _Optional[int] = ..., model_version: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("version", "parent", "creator", "created", "metrics", "active", "size", "parameters", "scoped_contexts", "adapted_for")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    CREATOR_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SCOPED_CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    ADAPTED_FOR_FIELD_NUMBER: _ClassVar[int]
    version: str
    parent: str
    creator: str
    created: str
    metrics: _containers.ScalarMap[str, float]
    active: bool
    size: str
    parameters: int
    scoped_contexts: _containers.RepeatedScalarFieldContainer[str]
    adapted_for: str
    def __init__(self, version: _Optional[str] = ..., parent: _Optional[str] = ..., creator: _Optional[str] = ..., created: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., active: _Optional[bool] = ..., size: _Optional[str] = ..., parameters: _Optional[int] = ..., scoped_contexts: _Optional[_Iterable[str]] = ..., adapted_for: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("version", "context")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    version: str
    context: str
    def __init__(self, version: _Optional[str] = ..., context: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "active_version", "scoped_versions")
    class ScopedVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCOPED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    active_version: str
    scoped_versions: _containers.ScalarMap[str, str]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., active_version: _Optional[str] = ..., scoped_versions: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ActivateModelRequest(_message.Message):
    __slots__ = ("version", "context")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    version: str
    context: str
    def __init__(self, version: _Optional[str] = ..., context: _Optional[str] = ...) -> None: ...

class ReleaseScopeRequest(_message.Message):
    __slots__ = ("context",)
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    context: str
    def __init__(self, context: _Optional[str] = ...) -> None: ...

class ReleaseScopeResponse(_message.Message):
    __slots__ = ("released", "serving_version")
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    released: bool
    serving_version: str
    def __init__(self, released: _Optional[bool] = ..., serving_version: _Optional[str] = ...) -> None: ...

class AdaptationRequest(_message.Message):
    __slots__ = ("context", "slot_ids", "method", "options", "global_update")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    SLOT_IDS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_UPDATE_FIELD_NUMBER: _ClassVar[int]
    context: str
    slot_ids: _containers.RepeatedScalarFieldContainer[str]
    method: str
    options: _containers.ScalarMap[str, str]
    global_update: bool
    def __init__(self, context: _Optional[str] = ..., slot_ids: _Optional[_Iterable[str]] = ..., method: _Optional[str] = ..., options: _Optional[_Mapping[str, str]] = ..., global_update: _Optional[bool] = ...) -> None: ...

class AdaptationJob(_message.Message):
    __slots__ = ("job_id", "state", "method", "context", "progress", "ber_before", "ber_after", "new_version", "message", "regression_ber_before", "regression_ber_after", "selected_summary", "rolled_back", "scope", "stage", "stage_seconds")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[AdaptationJob.State]
        QUEUED: _ClassVar[AdaptationJob.State]
        RUNNING: _ClassVar[AdaptationJob.State]
        ACCEPTED: _ClassVar[AdaptationJob.State]
        REJECTED: _ClassVar[AdaptationJob.State]
        FAILED: _ClassVar[AdaptationJob.State]
    STATE_UNSPECIFIED: AdaptationJob.State
    QUEUED: AdaptationJob.State
    RUNNING: AdaptationJob.State
    ACCEPTED: AdaptationJob.State
    REJECTED: AdaptationJob.State
    FAILED: AdaptationJob.State
    class StageSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    BER_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BER_AFTER_FIELD_NUMBER: _ClassVar[int]
    NEW_VERSION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REGRESSION_BER_BEFORE_FIELD_NUMBER: _ClassVar[int]
    REGRESSION_BER_AFTER_FIELD_NUMBER: _ClassVar[int]
    SELECTED_SUMMARY_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STAGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: AdaptationJob.State
    method: str
    context: str
    progress: float
    ber_before: float
    ber_after: float
    new_version: str
    message: str
    regression_ber_before: float
    regression_ber_after: float
    selected_summary: str
    rolled_back: bool
    scope: str
    stage: str
    stage_seconds: _containers.ScalarMap[str, float]
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[AdaptationJob.State, str]] = ..., method: _Optional[str] = ..., context: _Optional[str] = ..., progress: _Optional[float] = ..., ber_before: _Optional[float] = ..., ber_after: _Optional[float] = ..., new_version: _Optional[str] = ..., message: _Optional[str] = ..., regression_ber_before: _Optional[float] = ..., regression_ber_after: _Optional[float] = ..., selected_summary: _Optional[str] = ..., rolled_back: _Optional[bool] = ..., scope: _Optional[str] = ..., stage: _Optional[str] = ..., stage_seconds: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Target(_message.Message):
    __slots__ = ("context", "ber", "genie_ber", "slots", "is_target", "estimated_ber", "pilot_sinr_db", "serving_version")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    BER_FIELD_NUMBER: _ClassVar[int]
    GENIE_BER_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    IS_TARGET_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_BER_FIELD_NUMBER: _ClassVar[int]
    PILOT_SINR_DB_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    context: str
    ber: float
    genie_ber: float
    slots: int
    is_target: bool
    estimated_ber: float
    pilot_sinr_db: float
    serving_version: str
    def __init__(self, context: _Optional[str] = ..., ber: _Optional[float] = ..., genie_ber: _Optional[float] = ..., slots: _Optional[int] = ..., is_target: _Optional[bool] = ..., estimated_ber: _Optional[float] = ..., pilot_sinr_db: _Optional[float] = ..., serving_version: _Optional[str] = ...) -> None: ...

class ListTargetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTargetsResponse(_message.Message):
    __slots__ = ("contexts",)
    CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    contexts: _containers.RepeatedCompositeFieldContainer[Target]
    def __init__(self, contexts: _Optional[_Iterable[_Union[Target, _Mapping]]] = ...) -> None: ...

class GetAdaptationRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListAdaptationsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdaptationsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[AdaptationJob]
    def __init__(self, jobs: _Optional[_Iterable[_Union[AdaptationJob, _Mapping]]] = ...) -> None: ...
