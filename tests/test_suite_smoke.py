"""The benchmark suite runs end to end in its CPU mode (tiny shapes) and writes its record and table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_suite_cpu_mode_runs_and_records(tmp_path):
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "suite.py"), "--cpu", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    [record_file] = tmp_path.glob("*.json")
    [table_file] = tmp_path.glob("*.md")
    record = json.loads(record_file.read_text())
    for key in ("date", "commit", "device", "torch", "triton", "transformers", "rows"):
        assert key in record
    sections = {r["section"] for r in record["rows"]}
    assert sections == {"ceilings", "tests", "kernels", "decode", "throughput", "ttft"}
    errors = [r for r in record["rows"] if r["note"].startswith("error")]
    assert not errors, errors
    by_name = {(r["name"], r["baseline"]): r for r in record["rows"]}
    # Every measured row has a value; rows compared with a peer carry its value and the ratio.
    decode = by_name[("batch-1 decode codegen-tiny-py", "transformers eager")]
    assert decode["value"] > 0 and decode["baseline_value"] > 0
    assert abs(decode["ratio"] - decode["baseline_value"] / decode["value"]) < 1e-9
    floor = by_name[("batch-1 decode codegen-tiny-py", "bandwidth floor")]
    assert 0 < floor["ratio"] and floor["baseline_value"] > 0
    cached = [r for r in record["rows"] if r["section"] == "ttft" and r["baseline"] == "uncached"]
    assert cached and cached[0]["value"] > 0 and "prompt tokens from the cache" in cached[0]["note"]
    assert int(cached[0]["note"].split()[0]) > 0  # the second run did hit the prefix cache
    # The table is printed last, and is the file's content.
    assert p.stdout.strip().endswith(table_file.read_text().strip().splitlines()[-1])
    assert table_file.read_text().startswith("# fastcodegen benchmark suite")
