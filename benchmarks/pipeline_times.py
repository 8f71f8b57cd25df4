"""Wall time of a finished Snakemake run, per stage: jobs, summed job time, and the whole run.

    python benchmarks/pipeline_times.py .snakemake/log/<latest>.snakemake.log

Reads the timestamps Snakemake writes before each job starts ("rule X:" / "localrule X:" with
its jobid) and finishes ("Finished jobid: N"), so it needs nothing but the run's own log.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from datetime import datetime

STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
START = re.compile(r"^(?:local)?rule (\w+):$")
JOBID = re.compile(r"^\s+jobid: (\d+)$")
FINISHED = re.compile(r"^Finished jobid: (\d+)")


def job_times(lines):
    """{jobid: (rule, start, end)} from a Snakemake log."""
    stamp, rule, started, jobs = None, None, {}, {}
    for line in lines:
        line = line.rstrip("\n")
        if m := STAMP.match(line):
            stamp = datetime.strptime(" ".join(m.group(1).split()), "%a %b %d %H:%M:%S %Y")
        elif m := START.match(line):
            rule = m.group(1)
        elif (m := JOBID.match(line)) and rule:
            started[m.group(1)] = (rule, stamp)
            rule = None
        elif (m := FINISHED.match(line)) and m.group(1) in started:
            name, start = started[m.group(1)]
            jobs[m.group(1)] = (name, start, stamp)
    return jobs


def main(path: str) -> None:
    with open(path) as f:
        jobs = job_times(f)
    if not jobs:
        sys.exit(f"{path}: no finished jobs found")
    per_rule = defaultdict(lambda: [0, 0.0, None, None])
    for name, start, end in jobs.values():
        entry = per_rule[name]
        entry[0] += 1
        entry[1] += (end - start).total_seconds()
        entry[2] = start if entry[2] is None else min(entry[2], start)
        entry[3] = end if entry[3] is None else max(entry[3], end)
    first = min(s for _, s, _ in jobs.values())
    last = max(e for _, _, e in jobs.values())
    print(f"{'stage':12} {'jobs':>5} {'job-seconds':>12} {'wall span':>10}")
    for name, (n, seconds, start, end) in sorted(per_rule.items(), key=lambda kv: kv[1][2]):
        print(f"{name:12} {n:5d} {seconds:12.0f} {(end - start).total_seconds():10.0f}")
    print(f"{'total':12} {len(jobs):5d} {sum(e[1] for e in per_rule.values()):12.0f} "
          f"{(last - first).total_seconds():10.0f}")


if __name__ == "__main__":
    main(sys.argv[1])
