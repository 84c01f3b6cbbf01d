"""`attn1.to_q` alone: the smallest module the Wan targets match, for tests that compare
one linear with the one-linear float64 reference."""
import torch
import torch.nn as nn

from fp8_fx import FP8Config

ONE = FP8Config(targets=("attn1.to_q",), fallback="emulate")


class OneLinear(nn.Module):
    def __init__(self, k=64, n=48, bias=True, dtype=torch.float32):
        super().__init__()
        self.attn1 = nn.Module()
        self.attn1.to_q = nn.Linear(k, n, bias=bias, dtype=dtype)

    def forward(self, x):
        return self.attn1.to_q(x)
