"""One RESULTS.md table row per run, read from the run's own record, so no figure is copied by hand.

    PYTHONPATH=. python docs/study/run_rows.py docs/study/cpu-ipc10/pf4/seed1 [RUN_DIR ...]

Reads ``RUN_DIR/results.json`` (runs nothing, reads no data) and prints, per run, the columns
the IPC 10 tables of RESULTS.md use: a label (``<variant folder>, seed <k>``; rename it to the
table's words), the commit with the first session's start and the record's end (UTC), the
processor, each evaluation model's test accuracy, their mean +- population std, the same on
the validation split, and condensing / evaluation minutes over every session. What the record
cannot know (shared with tests, a lost model) stays for the writer to add.
"""

import datetime
import json
import os
import sys

from idm_jax.runs import study


def _minute(stamp: str) -> str:
    """``YYYY-MM-DD HH:MM:SS`` rounded to the nearest minute, as ``YYYY-MM-DD HH:MM``."""
    when = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S")
    return (when + datetime.timedelta(seconds=30)).strftime("%Y-%m-%d %H:%M")


def _when(record: dict) -> str:
    """From the first session's start to the record's end; the number of sessions when the run
    was stopped and started again (their work may or may not have been kept: say which)."""
    sessions = record.get("sessions") or []
    if not sessions or "date" not in record:
        return "date not recorded"
    start, end = _minute(sessions[0]["started"]), _minute(record["date"])
    span = f"{start} to {end[11:] if start[:10] == end[:10] else end}"
    return span if len(sessions) == 1 else f"{span} ({len(sessions)} sessions)"


def row(record: dict, label: str) -> str:
    """The markdown row of one run's ``results.json`` (a dict), labelled ``label``."""
    stats = study.stats([record])          # mean +- population std, as the study tables
    held_out = stats["validation_mean"]
    cpu = record.get("processor", {}).get("cpu", "processor not recorded")
    condense = study.condense_seconds(record)
    cells = [label,
             f"`{record.get('code_version', '?')[:7]}`, {_when(record)}, {cpu}",
             ", ".join(f"{a:.2f}" for a in record["accuracies"]),
             f"{stats['mean']:.2f} +- {stats['std']:.2f}",
             f"{held_out:.2f} +- {stats['validation_std']:.2f}" if held_out is not None else "-",
             f"{condense / 60:.1f} / {record.get('eval_seconds', 0.0) / 60:.1f} min"]
    return "| " + " | ".join(cells) + " |"


def main(paths) -> int:
    if not paths:
        print("error: give one or more run folders (each with a results.json), e.g. "
              "docs/study/cpu-ipc10/pf4/seed1", file=sys.stderr)
        return 2
    for path in paths:
        record_path = os.path.join(path, "results.json")
        if not os.path.isfile(record_path):
            print(f"error: {record_path}: no run record (is the run finished?)", file=sys.stderr)
            return 1
        try:
            with open(record_path) as f:
                record = json.load(f)
        except ValueError as err:
            print(f"error: {record_path}: not JSON ({err})", file=sys.stderr)
            return 1
        seed = record.get("config", {}).get("seed", "?")
        variant = os.path.basename(os.path.dirname(os.path.abspath(path)))
        print(row(record, f"{variant}, seed {seed}"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
