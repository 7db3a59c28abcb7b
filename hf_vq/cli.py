"""The `hf-vq` command line: `hf-vq convert ...` (CogVideo SAT checkpoint -> verified hf_vq folder / Hub repo)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from hf_vq.conversion import convert_cogvideo_sat

    parser = argparse.ArgumentParser(prog="hf-vq", description="hf-vq command line tools")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert the quantizer of a CogVideo SAT checkpoint",
                                  description=convert_cogvideo_sat.__doc__.split("\n")[0])
    convert_cogvideo_sat.build_parser(convert)
    convert.set_defaults(func=convert_cogvideo_sat.run)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
