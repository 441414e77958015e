"""Draw the curves of one or several runs to a PNG (needs matplotlib: pip install matplotlib).

    python -m tools.plot out-small                              # -> plot.png
    python -m tools.plot out-a out-b --out=compare.png          # one colour per run
    python -m tools.plot search-small/trial-* --out=search.png  # every trial of a search (tools/search.py)

Six panels from each run's metrics.jsonl: train loss (every log line) and val loss (every evaluation) against
steps, tokens and seconds; the learning rate, tokens/s and peak memory against steps. The spike guard's rollbacks
are dotted lines. train.py --plot=True keeps out_dir/loss.png current during a run.
"""

import argparse

from sologpt import plots
from sologpt.configurator import UserError, run_cli


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit 2; keep the one-line error convention
        raise UserError(f"{message} (see python -m tools.plot --help)")


def run(argv):
    parser = _Parser(description="Draw the loss, learning rate, speed and memory curves of train.py runs to a PNG.")
    parser.add_argument("out_dirs", nargs="+", help="out_dir folders of train.py runs (each with a metrics.jsonl)")
    parser.add_argument("--out", default="plot.png", help="the PNG to write (default plot.png)")
    parser.add_argument("--labels", default="", help="comma-separated names for the runs (default: folder names)")
    args = parser.parse_args(argv)
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    if labels is not None and len(labels) != len(args.out_dirs):
        raise UserError(f"--labels has {len(labels)} names for {len(args.out_dirs)} runs: give one per run")
    try:
        path = plots.draw(args.out_dirs, args.out, labels)
    except ValueError as e:
        raise UserError(str(e))
    except FileNotFoundError as e:
        raise UserError(f"cannot write {args.out}: {e.strerror} (does its folder exist?)")
    print(f"wrote {path} ({len(args.out_dirs)} run{'s' if len(args.out_dirs) > 1 else ''})")


def main(argv=None):
    run_cli(run, argv=argv)


if __name__ == "__main__":
    main()
