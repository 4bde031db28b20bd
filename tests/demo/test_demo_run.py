"""The demo runs to completion in its short mode and leaves no process behind."""

from __future__ import annotations

import os
import subprocess
import sys

from gpufleet.serving.procs import descendants, pid_alive


def test_short_demo_completes_and_leaves_nothing(tmp_path, repo_root):
    report = tmp_path / "report"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpufleet.cli.app",
            "demo",
            "--short",
            "--no-live",
            "--report-dir",
            str(report),
        ],  # fmt: skip
        cwd=repo_root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: set[int] = set()
    # Collect the demo's children while it runs (engines and routers), to check them afterwards.
    while proc.poll() is None:
        seen.update(descendants(proc.pid))
        try:
            proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
    out = proc.stdout.read()
    assert proc.returncode == 0, out
    assert "requests" in out and "full report:" in out, out
    assert (report / "report.md").is_file() and (report / "results.json").is_file()
    # Two fleets side by side: 3 engines and 3 routers for the default, 3 engines and one global
    # router for the baseline.
    assert len(seen) >= 10, f"expected 6 engines and 4 routers under the demo, saw {sorted(seen)}"
    alive = [pid for pid in seen if pid_alive(pid)]
    assert not alive, f"processes left behind: {alive}"
    # Both setups ran on the same load and are compared, in the summary and in the report.
    import json
    import re

    for label in ("default@regional", "instance-aware@global"):
        assert re.search(rf"^{re.escape(label)} \(.*\): requests \d+", out, re.M), out
    ratio = re.search(r"goodput default@regional / instance-aware@global: (\d+\.\d+)x", out)
    runs = json.loads((report / "results.json").read_text())["runs"]
    assert [r["policy"] for r in runs] == ["default@regional", "instance-aware@global"]
    assert runs[0]["summary"]["requests"] == runs[1]["summary"]["requests"] > 0  # the same load
    good = [r["summary"]["goodput_rps"] for r in runs]
    assert ratio and abs(float(ratio.group(1)) - good[0] / good[1]) < 0.01, (ratio, good)
    md = (report / "report.md").read_text()
    assert "## Side by side" in md and "| default@regional / instance-aware@global |" in md, md
    assert "failed through the region failure" in md
    # One clock: the region failure is reported in trace time, the report's clock (x2 the wall).
    events = next(line for line in out.splitlines() if line.startswith("events (trace time): "))

    killed = re.search(r"t=(\d+) s \S+ engines killed", events)
    # Half of 12 wall seconds at time x2 is t=12 s of trace time (the wall clock would say 6 s); the
    # dashboard polls every half wall second, so the kill lands within one poll after.
    assert killed and 12 <= int(killed.group(1)) <= 14, events


def test_bad_input_is_a_clean_exit(tmp_path, repo_root):
    env = {**os.environ}
    r = subprocess.run(
        [sys.executable, "-m", "gpufleet.cli.app", "demo", "--fleet", str(tmp_path / "none.yaml")],
        cwd=repo_root, capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "gpufleet.cli.app", "demo", "--region", "mars-1", "--short"],
        cwd=repo_root, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2 and "mars-1" in r.stderr and "Traceback" not in r.stderr


def test_bad_policy_or_reach_is_a_clean_exit(repo_root):
    """The demo's, the bench's and the router's policy and reach flags refuse unknown names."""
    for argv, word in (
        (["demo", "--baseline", "fastest"], "fastest"),
        (["demo", "--policy", "fastest", "--baseline", "none"], "fastest"),
        (["bench", "--http-run", "instance-aware@planet"], "instance-aware@planet"),
        (["bench", "--http-run", "fastest@global"], "fastest@global"),
        (["bench", "--no-sim", "--peer-policy", "round_robin"], "round_robin"),
        (["router", "serve", "--region", "aws-us-west-2", "--reach", "planet"], "planet"),
    ):
        r = subprocess.run([sys.executable, "-m", "gpufleet.cli.app", *argv], cwd=repo_root, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
        assert r.returncode == 2 and word in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr)
