"""Architecture converters to TransformerLens and their registry."""

from lens_callback.convert.base import (
    ConversionError,
    Converter,
    NotLogitsError,
    WeightCopier,
    available_converters,
    build_hooked_transformer,
    convert,
    copy_weights,
    effective_state_dict,
    get_converter,
    infer_converter,
    register_converter,
    strip_prefixes,
    unregister_converter,
    unwrap_module,
)
from lens_callback.convert import nanogpt as _nanogpt  # noqa: F401  (registers the built-ins)
from lens_callback.convert.api import converter_for_config, to_hooked_transformer
from lens_callback.convert.nanogpt import ModernNanoGPTConverter, NanoGPTConverter
from lens_callback.convert.parity import ParityReport, check_parity

__all__ = [
    "ConversionError",
    "Converter",
    "ModernNanoGPTConverter",
    "NanoGPTConverter",
    "NotLogitsError",
    "ParityReport",
    "WeightCopier",
    "available_converters",
    "build_hooked_transformer",
    "check_parity",
    "convert",
    "converter_for_config",
    "copy_weights",
    "effective_state_dict",
    "get_converter",
    "infer_converter",
    "register_converter",
    "strip_prefixes",
    "to_hooked_transformer",
    "unregister_converter",
    "unwrap_module",
]
