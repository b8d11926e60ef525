import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Domain(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DOMAIN_UNSPECIFIED: _ClassVar[Domain]
    DOMAIN_DISCRETE: _ClassVar[Domain]
    DOMAIN_CONTINUOUS: _ClassVar[Domain]

class LikelihoodKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LIKELIHOOD_KIND_UNSPECIFIED: _ClassVar[LikelihoodKind]
    LIKELIHOOD_KIND_EXACT: _ClassVar[LikelihoodKind]
    LIKELIHOOD_KIND_LOWER_BOUND: _ClassVar[LikelihoodKind]
    LIKELIHOOD_KIND_UNNORMALIZED: _ClassVar[LikelihoodKind]
    LIKELIHOOD_KIND_NONE: _ClassVar[LikelihoodKind]

class Operation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPERATION_UNSPECIFIED: _ClassVar[Operation]
    OPERATION_SAMPLE: _ClassVar[Operation]
    OPERATION_LOG_LIKELIHOOD: _ClassVar[Operation]
    OPERATION_ENCODE: _ClassVar[Operation]
    OPERATION_DECODE: _ClassVar[Operation]
DOMAIN_UNSPECIFIED: Domain
DOMAIN_DISCRETE: Domain
DOMAIN_CONTINUOUS: Domain
LIKELIHOOD_KIND_UNSPECIFIED: LikelihoodKind
LIKELIHOOD_KIND_EXACT: LikelihoodKind
LIKELIHOOD_KIND_LOWER_BOUND: LikelihoodKind
LIKELIHOOD_KIND_UNNORMALIZED: LikelihoodKind
LIKELIHOOD_KIND_NONE: LikelihoodKind
OPERATION_UNSPECIFIED: Operation
OPERATION_SAMPLE: Operation
OPERATION_LOG_LIKELIHOOD: Operation
OPERATION_ENCODE: Operation
OPERATION_DECODE: Operation

class DataSpec(_message.Message):
    __slots__ = ("name", "shape", "kind", "levels", "low", "high", "mean", "std", "dtype", "columns")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    kind: Domain
    levels: int
    low: float
    high: float
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    dtype: str
    columns: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., kind: _Optional[_Union[Domain, str]] = ..., levels: _Optional[int] = ..., low: _Optional[float] = ..., high: _Optional[float] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., dtype: _Optional[str] = ..., columns: _Optional[_Iterable[str]] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class GraphSpec(_message.Message):
    __slots__ = ("name", "file", "inputs", "outputs", "opset", "sha256", "fp16_file", "fp16_sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    OPSET_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FP16_FILE_FIELD_NUMBER: _ClassVar[int]
    FP16_SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    file: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    opset: int
    sha256: str
    fp16_file: str
    fp16_sha256: str
    def __init__(self, name: _Optional[str] = ..., file: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., opset: _Optional[int] = ..., sha256: _Optional[str] = ..., fp16_file: _Optional[str] = ..., fp16_sha256: _Optional[str] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("training_stability", "likelihood", "sampling_speed", "compression", "representation")
    TRAINING_STABILITY_FIELD_NUMBER: _ClassVar[int]
    LIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_SPEED_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    REPRESENTATION_FIELD_NUMBER: _ClassVar[int]
    training_stability: str
    likelihood: LikelihoodKind
    sampling_speed: str
    compression: str
    representation: bool
    def __init__(self, training_stability: _Optional[str] = ..., likelihood: _Optional[_Union[LikelihoodKind, str]] = ..., sampling_speed: _Optional[str] = ..., compression: _Optional[str] = ..., representation: _Optional[bool] = ...) -> None: ...

class Provenance(_message.Message):
    __slots__ = ("training_config_json", "code_revision", "created_at", "file_sha256", "tool_versions")
    class FileSha256Entry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ToolVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TRAINING_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    CODE_REVISION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    FILE_SHA256_FIELD_NUMBER: _ClassVar[int]
    TOOL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    training_config_json: str
    code_revision: str
    created_at: _timestamp_pb2.Timestamp
    file_sha256: _containers.ScalarMap[str, str]
    tool_versions: _containers.ScalarMap[str, str]
    def __init__(self, training_config_json: _Optional[str] = ..., code_revision: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., file_sha256: _Optional[_Mapping[str, str]] = ..., tool_versions: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ServingConfig(_message.Message):
    __slots__ = ("max_batch_size", "max_queue_delay_ms", "max_queue_size", "instances", "provider", "intra_op_threads", "fp16", "version_policy", "warmup", "adaptive_batching")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    INTRA_OP_THREADS_FIELD_NUMBER: _ClassVar[int]
    FP16_FIELD_NUMBER: _ClassVar[int]
    VERSION_POLICY_FIELD_NUMBER: _ClassVar[int]
    WARMUP_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_BATCHING_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_queue_delay_ms: float
    max_queue_size: int
    instances: int
    provider: str
    intra_op_threads: int
    fp16: bool
    version_policy: VersionPolicy
    warmup: bool
    adaptive_batching: bool
    def __init__(self, max_batch_size: _Optional[int] = ..., max_queue_delay_ms: _Optional[float] = ..., max_queue_size: _Optional[int] = ..., instances: _Optional[int] = ..., provider: _Optional[str] = ..., intra_op_threads: _Optional[int] = ..., fp16: _Optional[bool] = ..., version_policy: _Optional[_Union[VersionPolicy, _Mapping]] = ..., warmup: _Optional[bool] = ..., adaptive_batching: _Optional[bool] = ...) -> None: ...

class VersionPolicy(_message.Message):
    __slots__ = ("latest", "specific", "all")
    class Latest(_message.Message):
        __slots__ = ("num_versions",)
        NUM_VERSIONS_FIELD_NUMBER: _ClassVar[int]
        num_versions: int
        def __init__(self, num_versions: _Optional[int] = ...) -> None: ...
    class Specific(_message.Message):
        __slots__ = ("versions",)
        VERSIONS_FIELD_NUMBER: _ClassVar[int]
        versions: _containers.RepeatedScalarFieldContainer[int]
        def __init__(self, versions: _Optional[_Iterable[int]] = ...) -> None: ...
    class All(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    LATEST_FIELD_NUMBER: _ClassVar[int]
    SPECIFIC_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    latest: VersionPolicy.Latest
    specific: VersionPolicy.Specific
    all: VersionPolicy.All
    def __init__(self, latest: _Optional[_Union[VersionPolicy.Latest, _Mapping]] = ..., specific: _Optional[_Union[VersionPolicy.Specific, _Mapping]] = ..., all: _Optional[_Union[VersionPolicy.All, _Mapping]] = ...) -> None: ...

class ModelManifest(_message.Message):
    __slots__ = ("format_version", "name", "version", "family", "model", "description", "data", "graphs", "capabilities", "operations", "parameters", "test_metrics", "provenance", "serving", "members", "score_kinds", "calibration")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class TestMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    GRAPHS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    TEST_METRICS_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    SCORE_KINDS_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    name: str
    version: int
    family: str
    model: str
    description: str
    data: DataSpec
    graphs: _containers.RepeatedCompositeFieldContainer[GraphSpec]
    capabilities: Capabilities
    operations: _containers.RepeatedScalarFieldContainer[Operation]
    parameters: _containers.ScalarMap[str, float]
    test_metrics: _containers.ScalarMap[str, float]
    provenance: Provenance
    serving: ServingConfig
    members: _containers.RepeatedCompositeFieldContainer[MixtureMember]
    score_kinds: _containers.RepeatedCompositeFieldContainer[ScoreKind]
    calibration: _containers.RepeatedCompositeFieldContainer[ScoreCalibration]
    def __init__(self, format_version: _Optional[int] = ..., name: _Optional[str] = ..., version: _Optional[int] = ..., family: _Optional[str] = ..., model: _Optional[str] = ..., description: _Optional[str] = ..., data: _Optional[_Union[DataSpec, _Mapping]] = ..., graphs: _Optional[_Iterable[_Union[GraphSpec, _Mapping]]] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., operations: _Optional[_Iterable[_Union[Operation, str]]] = ..., parameters: _Optional[_Mapping[str, float]] = ..., test_metrics: _Optional[_Mapping[str, float]] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ..., serving: _Optional[_Union[ServingConfig, _Mapping]] = ..., members: _Optional[_Iterable[_Union[MixtureMember, _Mapping]]] = ..., score_kinds: _Optional[_Iterable[_Union[ScoreKind, _Mapping]]] = ..., calibration: _Optional[_Iterable[_Union[ScoreCalibration, _Mapping]]] = ...) -> None: ...

class MixtureMember(_message.Message):
    __slots__ = ("prefix", "family", "model", "weight", "parameters", "likelihood", "source")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    LIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    family: str
    model: str
    weight: float
    parameters: _containers.ScalarMap[str, float]
    likelihood: LikelihoodKind
    source: str
    def __init__(self, prefix: _Optional[str] = ..., family: _Optional[str] = ..., model: _Optional[str] = ..., weight: _Optional[float] = ..., parameters: _Optional[_Mapping[str, float]] = ..., likelihood: _Optional[_Union[LikelihoodKind, str]] = ..., source: _Optional[str] = ...) -> None: ...

class ScoreKind(_message.Message):
    __slots__ = ("name", "description", "higher_is_normal", "per_batch")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    HIGHER_IS_NORMAL_FIELD_NUMBER: _ClassVar[int]
    PER_BATCH_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    higher_is_normal: bool
    per_batch: bool
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., higher_is_normal: _Optional[bool] = ..., per_batch: _Optional[bool] = ...) -> None: ...

class ScoreCalibration(_message.Message):
    __slots__ = ("score", "probabilities", "quantiles", "rows", "data", "seed", "noise")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    QUANTILES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    score: str
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    quantiles: _containers.RepeatedScalarFieldContainer[float]
    rows: int
    data: str
    seed: int
    noise: str
    def __init__(self, score: _Optional[str] = ..., probabilities: _Optional[_Iterable[float]] = ..., quantiles: _Optional[_Iterable[float]] = ..., rows: _Optional[int] = ..., data: _Optional[str] = ..., seed: _Optional[int] = ..., noise: _Optional[str] = ...) -> None: ...
