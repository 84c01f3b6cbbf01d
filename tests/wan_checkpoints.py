"""Synthetic local Wan checkpoints (from a tiny random model) in the formats users have."""
import re

from safetensors.torch import save_file

# diffusers name -> original Wan2.1 name (the inverse of diffusers' single-file mapping).
_TO_ORIGINAL = [
    (r"condition_embedder\.time_embedder\.linear_1", "time_embedding.0"),
    (r"condition_embedder\.time_embedder\.linear_2", "time_embedding.2"),
    (r"condition_embedder\.text_embedder\.linear_1", "text_embedding.0"),
    (r"condition_embedder\.text_embedder\.linear_2", "text_embedding.2"),
    (r"condition_embedder\.time_proj", "time_projection.1"),
    (r"\.attn1\.", ".self_attn."), (r"\.attn2\.", ".cross_attn."),
    (r"\.to_out\.0\.", ".o."), (r"\.to_q\.", ".q."), (r"\.to_k\.", ".k."), (r"\.to_v\.", ".v."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."), (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^scale_shift_table$", "head.modulation"), (r"\.scale_shift_table$", ".modulation"),
    (r"^proj_out\.", "head.head."),
    (r"\.norm2\.", ".norm_swap."), (r"\.norm3\.", ".norm2."), (r"\.norm_swap\.", ".norm3."),
]


def to_original_wan_names(state):
    out = {}
    for key, value in state.items():
        for pattern, repl in _TO_ORIGINAL:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def save_original_wan_file(model, path):
    save_file({k: v.contiguous() for k, v in to_original_wan_names(model.state_dict()).items()}, str(path))


def save_diffusers_file(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
