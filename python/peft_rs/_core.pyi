"""Type stubs of the compiled module peft_rs._core (kept in step with rust/peft-rs-py/src)."""

from collections.abc import Mapping
from os import PathLike
from typing import Any, Literal, TypeVar

__version__: str
CUDA_ENABLED: bool

# A numpy.ndarray or a torch.Tensor; results come back as the type that was passed.
Array = Any
A = TypeVar("A")
_IntOrPair = int | tuple[int, int]

class LoraConfig:
    """PEFT's LoraConfig: same keyword names, defaults and JSON form."""

    def __init__(self, **kwargs: Any) -> None: ...
    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> LoraConfig: ...
    def to_dict(self) -> dict[str, Any]: ...
    @property
    def peft_type(self) -> Literal["LORA"]: ...
    def __getattr__(self, name: str) -> Any: ...

class IA3Config:
    """IA³ configuration (`peft.IA3Config`): same keyword names, defaults and JSON form."""

    def __init__(self, **kwargs: Any) -> None: ...
    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> IA3Config: ...
    def to_dict(self) -> dict[str, Any]: ...
    @property
    def peft_type(self) -> Literal["IA3"]: ...
    def __getattr__(self, name: str) -> Any: ...

class AdaLoraConfig:
    """AdaLoRA configuration (`peft.AdaLoraConfig`): same keyword names, defaults and JSON form."""

    def __init__(self, **kwargs: Any) -> None: ...
    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> AdaLoraConfig: ...
    def to_dict(self) -> dict[str, Any]: ...
    @property
    def peft_type(self) -> Literal["ADALORA"]: ...
    def __getattr__(self, name: str) -> Any: ...

class VeraConfig:
    """VeRA configuration (`peft.VeraConfig`): same keyword names, defaults and JSON form."""

    def __init__(self, **kwargs: Any) -> None: ...
    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> VeraConfig: ...
    def to_dict(self) -> dict[str, Any]: ...
    @property
    def peft_type(self) -> Literal["VERA"]: ...
    def __getattr__(self, name: str) -> Any: ...

class _AdapterLayer:
    def forward(self, x: A) -> A: ...
    def __call__(self, x: A) -> A: ...
    def merge(self, safe_merge: bool = False) -> None: ...
    def unmerge(self) -> None: ...
    @property
    def merged(self) -> bool: ...
    def delta_weight(self) -> Array: ...
    @property
    def base_weight(self) -> Array: ...
    @property
    def base_bias(self) -> Array | None: ...
    def num_parameters(self) -> int: ...
    def weights(self) -> dict[str, Array]: ...
    @property
    def config(self) -> LoraConfig | AdaLoraConfig | IA3Config | VeraConfig: ...
    def train(self, mode: bool = True) -> None: ...
    def eval(self) -> None: ...
    @property
    def training(self) -> bool: ...

class LoraLinear(_AdapterLayer):
    def __init__(
        self,
        weight: Array,
        bias: Array | None = None,
        *,
        config: LoraConfig | None = None,
        lora_A: Array | None = None,
        lora_B: Array | None = None,
        lora_B_bias: Array | None = None,
        lora_magnitude_vector: Array | None = None,
        fan_in_fan_out: bool = False,
        module_name: str = "",
        seed: int = 0,
    ) -> None: ...

class LoraEmbedding(_AdapterLayer):
    def __init__(
        self,
        weight: Array,
        *,
        config: LoraConfig | None = None,
        lora_embedding_A: Array | None = None,
        lora_embedding_B: Array | None = None,
        lora_magnitude_vector: Array | None = None,
        module_name: str = "",
        seed: int = 0,
    ) -> None: ...

class LoraConv2d(_AdapterLayer):
    def __init__(
        self,
        weight: Array,
        bias: Array | None = None,
        *,
        stride: _IntOrPair | None = None,
        padding: _IntOrPair | None = None,
        dilation: _IntOrPair | None = None,
        groups: int = 1,
        config: LoraConfig | None = None,
        lora_A: Array | None = None,
        lora_B: Array | None = None,
        lora_B_bias: Array | None = None,
        lora_magnitude_vector: Array | None = None,
        module_name: str = "",
        seed: int = 0,
    ) -> None: ...

class IA3Linear(_AdapterLayer):
    def __init__(
        self,
        weight: Array,
        bias: Array | None = None,
        *,
        config: IA3Config | None = None,
        ia3_l: Array | None = None,
        feedforward: bool | None = None,
        fan_in_fan_out: bool = False,
        module_name: str = "",
        seed: int = 0,
    ) -> None: ...

class IA3Conv2d(_AdapterLayer):
    def __init__(
        self,
        weight: Array,
        bias: Array | None = None,
        *,
        stride: _IntOrPair | None = None,
        padding: _IntOrPair | None = None,
        dilation: _IntOrPair | None = None,
        groups: int = 1,
        config: IA3Config | None = None,
        ia3_l: Array | None = None,
        feedforward: bool | None = None,
        module_name: str = "",
        seed: int = 0,
    ) -> None: ...

class AdaLoraLinear(_AdapterLayer):
    def __init__(
        self,
        weight: Array,
        bias: Array | None = None,
        *,
        config: AdaLoraConfig,
        lora_A: Array | None = None,
        lora_B: Array | None = None,
        lora_E: Array | None = None,
        fan_in_fan_out: bool = False,
        module_name: str = "",
        seed: int = 0,
    ) -> None: ...

class VeraLinear(_AdapterLayer):
    def __init__(
        self,
        weight: Array,
        bias: Array | None = None,
        *,
        config: VeraConfig | None = None,
        vera_A: Array | None = None,
        vera_B: Array | None = None,
        vera_lambda_b: Array | None = None,
        vera_lambda_d: Array | None = None,
        fan_in_fan_out: bool = False,
        module_name: str = "",
        seed: int = 0,
    ) -> None: ...

class PeftAdapter:
    @staticmethod
    def from_pretrained(path: str | PathLike[str], adapter_name: str | None = None) -> PeftAdapter: ...
    @staticmethod
    def create(
        config: LoraConfig | AdaLoraConfig | IA3Config | VeraConfig,
        state_dict: Mapping[str, Array],
        module_types: Mapping[str, Literal["linear", "conv1d", "embedding", "conv2d"]],
        *,
        adapter_name: str = "default",
        seed: int = 0,
    ) -> PeftAdapter: ...
    @property
    def peft_type(self) -> str: ...
    @property
    def adapter_name(self) -> str: ...
    @property
    def config(self) -> LoraConfig | AdaLoraConfig | IA3Config | VeraConfig: ...
    def module_names(self) -> list[str]: ...
    def merge_into(
        self, state_dict: Mapping[str, Array], *, safe_merge: bool = False
    ) -> dict[str, Array]: ...
    def layer(
        self,
        module_name: str,
        state_dict: Mapping[str, Array],
        *,
        stride: _IntOrPair | None = None,
        padding: _IntOrPair | None = None,
        dilation: _IntOrPair | None = None,
        groups: int = 1,
    ) -> LoraLinear | LoraEmbedding | LoraConv2d | AdaLoraLinear | IA3Linear | IA3Conv2d | VeraLinear: ...
    def forward(self, module_name: str, x: A, state_dict: Mapping[str, Array]) -> A: ...
    def state_dict(self, framework: Literal["numpy", "torch"] = "numpy") -> dict[str, Array]: ...
    def save_pretrained(self, path: str | PathLike[str]) -> str: ...

class DLPackExport:
    def __dlpack__(
        self,
        *,
        stream: Any = None,
        max_version: tuple[int, int] | None = None,
        dl_device: tuple[int, int] | None = None,
        copy: bool | None = None,
    ) -> Any: ...
    def __dlpack_device__(self) -> tuple[int, int]: ...
