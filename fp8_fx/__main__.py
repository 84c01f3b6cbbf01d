"""python -m fp8_fx {demo,inspect} ..."""
import sys

USAGE = """usage: python -m fp8_fx {demo,inspect} [options]
  demo     denoise with a Wan DiT in bf16 and FP8 side by side (examples/wan_fp8.py);
           demo --pipeline PATH --prompt TEXT: a whole local WanPipeline, both videos side by side
  inspect  print the pass's decisions and the rewritten graph of a Wan DiT"""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("demo", "inspect"):
        print(USAGE, file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    if argv[0] == "demo":
        from .demo import main as command
    else:
        from .inspect_graph import main as command
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
