"""Print the figures of every evaluation of a workdir, and where its pictures are.

Usage: python scripts/summarize.py WORKDIR

Reads ``WORKDIR/*/report.json`` (one per ``--eval_folder``) and prints one line per evaluated
snapshot: bits/dim with its standard error, the method (ODE or bound), the dequantisation, the
number of images and the mean number of function evaluations; then the PNG files of the run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(workdir: str) -> int:
    root = Path(workdir)
    reports = sorted(root.glob("*/report.json"))
    if not reports:
        print(f"no report.json under {root}: run --mode eval first", file=sys.stderr)
        return 1
    header = f"{'eval folder':<14}{'ckpt':>5}{'step':>7}  {'method':<7}{'dequant.':<13}"
    print(header + f"{'bits/dim':>17}{'images':>8}{'NFE':>7}")
    for path in reports:
        entries = json.loads(path.read_text())["checkpoints"].values()
        for entry in sorted(entries, key=lambda e: (e["checkpoint"], e.get("method", ""))):
            line = f"{path.parent.name:<14}{entry['checkpoint']:>5}{entry['step']:>7}  "
            if "bpd" in entry:
                bpd = f"{entry['bpd']:.4f} +- {entry['bpd_stderr']:.4f}"
                line += f"{entry['method']:<7}{entry['dequantization']:<13}{bpd:>17}"
                line += f"{entry['num_images']:>8}{entry['nfe_mean']:>7.0f}"
            elif "samples_dir" in entry:
                count = entry.get("num_samples", 0)
                line += f"{'samples':<20}{count:>17} in {entry['samples_dir']}"
            else:
                line += "no results (neither bits/dim nor samples were asked for)"
            print(line)
    print("\npictures:")
    for png in sorted(root.rglob("*.png")):
        if "samples_ckpt" in str(png.parent) and not png.name.endswith("_0.png"):
            continue  # one grid per sampling folder is enough to list
        print(f"  {png}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[2])
    sys.exit(main(sys.argv[1]))
