"""Small Wan-like DiTs in the three naming schemes (diffusers, FastVideo, original Wan2.1).

Same math in each (self-attention, cross-attention to text, GELU FFN, modulation-free
LayerNorms); only the module paths differ, which is what the pass matches on.
"""
import torch.nn as nn
import torch.nn.functional as F

# scheme -> (self-attn q, k, v, out), (cross-attn q, k, v, out), (ffn in, ffn out) paths
SCHEMES = {
    "diffusers": (("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"),
                  ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"),
                  ("ffn.net.0.proj", "ffn.net.2")),
    "fastvideo": (("to_q", "to_k", "to_v", "to_out"),
                  ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out"),
                  ("ffn.fc_in", "ffn.fc_out")),
    "wan": (("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o"),
            ("cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o"),
            ("ffn.0", "ffn.2")),
}


def _set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, leaf = path.split(".")
    for name in parents:
        if not hasattr(root, name):
            root.add_module(name, nn.Module())
        root = getattr(root, name)
    root.add_module(leaf, module)


def _get_path(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


class WanLikeBlock(nn.Module):
    def __init__(self, scheme: str, dim: int, ffn_dim: int, heads: int, bias: bool = True):
        super().__init__()
        self.paths = SCHEMES[scheme]
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False)
        for attn in self.paths[:2]:
            for path in attn:
                _set_path(self, path, nn.Linear(dim, dim, bias=bias))
        ffn_in, ffn_out = self.paths[2]
        _set_path(self, ffn_in, nn.Linear(dim, ffn_dim, bias=bias))
        _set_path(self, ffn_out, nn.Linear(ffn_dim, dim, bias=bias))

    def _attention(self, paths, x, context):
        q, k, v, o = (_get_path(self, p) for p in paths)
        b, n, d = x.shape

        def heads(t):
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        a = F.scaled_dot_product_attention(heads(q(x)), heads(k(context)), heads(v(context)))
        return o(a.transpose(1, 2).flatten(2))

    def forward(self, x, context):
        h = self.norm1(x)
        x = x + self._attention(self.paths[0], h, h)
        x = x + self._attention(self.paths[1], self.norm2(x), context)
        ffn_in, ffn_out = (_get_path(self, p) for p in self.paths[2])
        return x + ffn_out(F.gelu(ffn_in(self.norm3(x)), approximate="tanh"))


class WanLikeModel(nn.Module):
    """patch_embedding -> time_projection (modulation stand-in) -> blocks -> proj_out."""

    def __init__(self, scheme: str = "diffusers", dim: int = 32, ffn_dim: int = 64,
                 heads: int = 2, layers: int = 2, in_dim: int = 16, bias: bool = True):
        super().__init__()
        self.patch_embedding = nn.Linear(in_dim, dim)
        self.time_projection = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(WanLikeBlock(scheme, dim, ffn_dim, heads, bias)
                                    for _ in range(layers))
        self.proj_out = nn.Linear(dim, in_dim)

    def forward(self, x, context):
        x = self.patch_embedding(x)
        x = x + self.time_projection(F.silu(x.mean(dim=1, keepdim=True)))
        for block in self.blocks:
            x = block(x, context)
        return self.proj_out(x)


def targeted_qualnames(scheme: str, layers: int = 2):
    paths = [p for group in SCHEMES[scheme] for p in group]
    return [f"blocks.{i}.{p}" for i in range(layers) for p in paths]
