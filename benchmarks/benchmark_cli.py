"""The command line every benchmark module shares: options → `measure(**options)` → `report(figures)` → JSON."""

import argparse
import json


def run(description: str, measure, report, options: dict) -> dict:
    """Parse `--option value` for each `options` entry (name → default), measure, print, optionally save."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in options.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    parser.add_argument("--output", default=None, help="also write the figures to this JSON file")
    args = vars(parser.parse_args())
    output = args.pop("output")
    figures = measure(**args)
    report(figures)
    if output:
        with open(output, "w") as handle:
            json.dump(figures, handle, indent=2, default=float)
    return figures
