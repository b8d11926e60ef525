from genserve.v1 import manifest_pb2 as _manifest_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_LOADING: _ClassVar[ModelState]
    MODEL_STATE_READY: _ClassVar[ModelState]
    MODEL_STATE_FAILED: _ClassVar[ModelState]
    MODEL_STATE_UNAVAILABLE: _ClassVar[ModelState]
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_LOADING: ModelState
MODEL_STATE_READY: ModelState
MODEL_STATE_FAILED: ModelState
MODEL_STATE_UNAVAILABLE: ModelState

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "versions", "default_version", "family", "model", "operations", "state", "message")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedScalarFieldContainer[int]
    default_version: int
    family: str
    model: str
    operations: _containers.RepeatedScalarFieldContainer[_manifest_pb2.Operation]
    state: ModelState
    message: str
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[int]] = ..., default_version: _Optional[int] = ..., family: _Optional[str] = ..., model: _Optional[str] = ..., operations: _Optional[_Iterable[_Union[_manifest_pb2.Operation, str]]] = ..., state: _Optional[_Union[ModelState, str]] = ..., message: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "versions", "default_version", "state", "manifest", "serving", "providers")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    versions: _containers.RepeatedScalarFieldContainer[int]
    default_version: int
    state: ModelState
    manifest: _manifest_pb2.ModelManifest
    serving: _manifest_pb2.ServingConfig
    providers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., versions: _Optional[_Iterable[int]] = ..., default_version: _Optional[int] = ..., state: _Optional[_Union[ModelState, str]] = ..., manifest: _Optional[_Union[_manifest_pb2.ModelManifest, _Mapping]] = ..., serving: _Optional[_Union[_manifest_pb2.ServingConfig, _Mapping]] = ..., providers: _Optional[_Iterable[str]] = ...) -> None: ...

class SampleRequest(_message.Message):
    __slots__ = ("model", "version", "n", "seed", "temperature", "langevin_steps", "langevin_step_size", "return_latents")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    LANGEVIN_STEPS_FIELD_NUMBER: _ClassVar[int]
    LANGEVIN_STEP_SIZE_FIELD_NUMBER: _ClassVar[int]
    RETURN_LATENTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    n: int
    seed: int
    temperature: float
    langevin_steps: int
    langevin_step_size: float
    return_latents: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., n: _Optional[int] = ..., seed: _Optional[int] = ..., temperature: _Optional[float] = ..., langevin_steps: _Optional[int] = ..., langevin_step_size: _Optional[float] = ..., return_latents: _Optional[bool] = ...) -> None: ...

class SampleStreamRequest(_message.Message):
    __slots__ = ("sample", "chunk_size")
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    sample: SampleRequest
    chunk_size: int
    def __init__(self, sample: _Optional[_Union[SampleRequest, _Mapping]] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class SampleResponse(_message.Message):
    __slots__ = ("samples", "latents", "model_version", "seed", "offset")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    samples: Tensor
    latents: Tensor
    model_version: int
    seed: int
    offset: int
    def __init__(self, samples: _Optional[_Union[Tensor, _Mapping]] = ..., latents: _Optional[_Union[Tensor, _Mapping]] = ..., model_version: _Optional[int] = ..., seed: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class LogLikelihoodRequest(_message.Message):
    __slots__ = ("model", "version", "x", "importance_samples", "seed", "chunk_id", "scores", "percentile", "per_dimension", "draws")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    PERCENTILE_FIELD_NUMBER: _ClassVar[int]
    PER_DIMENSION_FIELD_NUMBER: _ClassVar[int]
    DRAWS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    x: Tensor
    importance_samples: int
    seed: int
    chunk_id: int
    scores: _containers.RepeatedScalarFieldContainer[str]
    percentile: bool
    per_dimension: bool
    draws: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., importance_samples: _Optional[int] = ..., seed: _Optional[int] = ..., chunk_id: _Optional[int] = ..., scores: _Optional[_Iterable[str]] = ..., percentile: _Optional[bool] = ..., per_dimension: _Optional[bool] = ..., draws: _Optional[int] = ...) -> None: ...

class LogLikelihoodResponse(_message.Message):
    __slots__ = ("log_prob", "bits_per_dim", "kind", "model_version", "chunk_id", "seed", "per_dimension", "scores", "percentiles")
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    class PercentilesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    BITS_PER_DIM_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PER_DIMENSION_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    PERCENTILES_FIELD_NUMBER: _ClassVar[int]
    log_prob: Tensor
    bits_per_dim: Tensor
    kind: _manifest_pb2.LikelihoodKind
    model_version: int
    chunk_id: int
    seed: int
    per_dimension: Tensor
    scores: _containers.MessageMap[str, Tensor]
    percentiles: _containers.MessageMap[str, Tensor]
    def __init__(self, log_prob: _Optional[_Union[Tensor, _Mapping]] = ..., bits_per_dim: _Optional[_Union[Tensor, _Mapping]] = ..., kind: _Optional[_Union[_manifest_pb2.LikelihoodKind, str]] = ..., model_version: _Optional[int] = ..., chunk_id: _Optional[int] = ..., seed: _Optional[int] = ..., per_dimension: _Optional[_Union[Tensor, _Mapping]] = ..., scores: _Optional[_Mapping[str, Tensor]] = ..., percentiles: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("model", "version", "x", "seed", "sample")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    x: Tensor
    seed: int
    sample: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., seed: _Optional[int] = ..., sample: _Optional[bool] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("z", "model_version", "seed")
    Z_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    z: Tensor
    model_version: int
    seed: int
    def __init__(self, z: _Optional[_Union[Tensor, _Mapping]] = ..., model_version: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("model", "version", "z", "seed", "sample")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    z: Tensor
    seed: int
    sample: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., z: _Optional[_Union[Tensor, _Mapping]] = ..., seed: _Optional[int] = ..., sample: _Optional[bool] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("x", "model_version", "seed")
    X_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    x: Tensor
    model_version: int
    seed: int
    def __init__(self, x: _Optional[_Union[Tensor, _Mapping]] = ..., model_version: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadError(_message.Message):
    __slots__ = ("model", "version", "message")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    message: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("models", "errors")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    errors: _containers.RepeatedCompositeFieldContainer[LoadError]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ..., errors: _Optional[_Iterable[_Union[LoadError, _Mapping]]] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelSummary
    def __init__(self, model: _Optional[_Union[ModelSummary, _Mapping]] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelSummary
    def __init__(self, model: _Optional[_Union[ModelSummary, _Mapping]] = ...) -> None: ...
