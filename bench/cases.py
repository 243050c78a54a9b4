"""Shared by the benches: one case measured in a fresh process, so each peak RSS starts clean."""
import json
import subprocess
import sys


def case_in_subprocess(script: str, label: str, args: list):
    """Run `python script *args` (the script's internal --case mode); -> the JSON of its last
    stdout line, or None after printing why it failed."""
    out = subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True)
    if out.returncode:
        print(f"{label}: failed ({out.stderr.strip().splitlines()[-1:]})")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])
