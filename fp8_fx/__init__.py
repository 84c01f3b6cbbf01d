"""fp8_fx: a torch.compile backend that serves Wan video DiTs in FP8.

    compiled = torch.compile(transformer, backend=fp8_fx.fp8_backend)
"""
from . import attention_recipes, ops  # register the fp8_fx torch.library ops
from . import wan  # diffusers is imported only when a Wan model is built or loaded
from .backend import FP8Backend, fp8_backend, make_fp8_backend
from .calibrate import calibrate_input_amax, set_input_scales
from .checkpoints import FP8CheckpointError, load_fp8_checkpoint, save_fp8_checkpoint
from .config import (DIFFUSERS_WAN_TARGETS, FASTVIDEO_WAN_TARGETS, ORIGINAL_WAN_TARGETS,
                     WAN_I2V_IMAGE_KV_TARGETS, WAN_TARGETS, AttentionConfig, FP8Config)
from .modules import FP8Linear, convert_to_fp8, fp8_weight_bytes
from . import offload  # offloading (diffusers, accelerate) with compiled experts
from .experts import CompiledExperts, ExpertsReport, compile_experts
from .offload import OffloadError
from .qualname import normalize_qualname
from .report import AttentionDecision, GraphInfo, LinearDecision, Report
from .weight_cache import refresh_weights

__all__ = [
    "FP8Backend", "FP8Config", "LinearDecision", "Report", "fp8_backend", "make_fp8_backend",
    "normalize_qualname", "ops", "WAN_TARGETS", "DIFFUSERS_WAN_TARGETS", "FASTVIDEO_WAN_TARGETS",
    "ORIGINAL_WAN_TARGETS", "WAN_I2V_IMAGE_KV_TARGETS", "FP8Linear", "FP8CheckpointError",
    "convert_to_fp8", "fp8_weight_bytes", "save_fp8_checkpoint", "load_fp8_checkpoint",
    "calibrate_input_amax", "set_input_scales", "refresh_weights", "GraphInfo", "wan",
    "AttentionConfig", "AttentionDecision", "attention_recipes",
    "compile_experts", "CompiledExperts", "ExpertsReport", "offload", "OffloadError",
]
__version__ = "0.1.0"
