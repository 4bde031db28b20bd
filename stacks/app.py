"""The cdktn app entry point: `python -m gpufleet.stacks.app` (what cdktf.json's `app` runs).

Synthesizes the fleet file named by GPUFLEET_FLEET (default ./fleet.yaml) into the output folder the
cdktn CLI chooses (CDKTF_OUTDIR), or cdktf.out/ when run by hand. GPUFLEET_IMAGE, when set, overrides
the fleet's serving.image (as `gpufleet synth --image` does). A bad fleet file prints its problems
and exits 2, like `gpufleet validate`. Like `gpufleet synth`, it records the fleet file in
<outdir>/gpufleet.json.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main() -> int:
    from gpufleet.stacks.fleetfile import FleetFileError, load_fleet
    from gpufleet.stacks.synth import build_app, write_fleet_record

    path = Path(os.environ.get("GPUFLEET_FLEET", "fleet.yaml"))
    try:
        fleet = load_fleet(path)
    except FleetFileError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    # Under `cdktn synth` the CLI passes the output folder in CDKTF_OUTDIR; the App reads it itself.
    outdir = None if "CDKTF_OUTDIR" in os.environ else Path("cdktf.out")
    try:
        app, _ = build_app(fleet, outdir, image=os.environ.get("GPUFLEET_IMAGE") or None)
    except ValueError as exc:  # a fleet the clouds cannot build (e.g. one AWS zone for EKS)
        print(f"error: {path}: {exc}", file=sys.stderr)
        return 2
    app.synth()
    # as `gpufleet synth` does: plan-check without --fleet finds the fleet file through it
    write_fleet_record(os.environ.get("CDKTF_OUTDIR") or "cdktf.out", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
