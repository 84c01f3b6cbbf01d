"""The Wan FP8 demo: the same denoising loop in bf16 and FP8, compiled, side by side.

    python examples/wan_fp8.py                    # tiny random Wan DiT, CPU, about a minute
    python examples/wan_fp8.py --help             # real sizes, checkpoints, JSON, plot
"""
import sys

from fp8_fx.demo import main

if __name__ == "__main__":
    sys.exit(main(prog="python examples/wan_fp8.py"))
