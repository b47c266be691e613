"""Bring a campaign's finished run records into docs/study, where the tables are drawn from.

A work folder (``experiments.campaign --workdir W``) holds checkpoints, logs and the records of
finished runs side by side; docs/study keeps only the records, because a work folder does not
outlive its machine. For each of ``cpu-ipc1``, ``cpu-ipc10``, ``tune-ipc1`` and ``tune-ipc10``
under W this copies, keeping the folder layout:

- every finished run: a folder with ``results.json`` (or ``failed.json``), with its
  ``synthetic.png``; a run still going (only checkpoints and a picture so far) is left out,
  so a table drawn afterwards never shows half a run;
- each tuning's own record (``tuning.md``, ``.json``, ``.png``) and the campaign's choice of
  third seeds (``third-seeds.json``).

A record whose only change is a ``date`` (a finished step run again rewrites its summary) is
not copied, so an import of nothing new changes nothing. Tables (``study.*``,
``comparison.*``) are not copied: a step's own table covers only that step's seeds, and
``bash docs/study/make_tables.sh`` redraws them over every record. Nothing under
``checkpoints/`` or ``previous/`` is read; it runs nothing and reads no data. From the
repository root: ``python docs/study/import_records.py W``.
"""

import argparse
import json
import os
import shutil
import sys

STUDY = os.path.dirname(os.path.abspath(__file__))
FOLDERS = ("cpu-ipc1", "cpu-ipc10", "tune-ipc1", "tune-ipc10")
RUN_RECORDS = ("results.json", "failed.json", "synthetic.png")
SUMMARY_PREFIXES = ("tuning.",)
SUMMARY_FILES = ("third-seeds.json",)
SKIPPED = ("checkpoints", "previous")


def records(folder: str) -> list[str]:
    """The paths, relative to ``folder``, of the records to keep: finished runs' files and
    the summaries, in a stable order."""
    kept = []
    for here, subfolders, files in os.walk(folder):
        subfolders[:] = sorted(d for d in subfolders if d not in SKIPPED)
        finished = "results.json" in files or "failed.json" in files
        for name in sorted(files):
            summary = name.startswith(SUMMARY_PREFIXES) or name in SUMMARY_FILES
            if summary or (finished and name in RUN_RECORDS):
                kept.append(os.path.relpath(os.path.join(here, name), folder))
    return kept


def _undated(value):
    if isinstance(value, dict):
        return {k: _undated(v) for k, v in value.items() if k != "date"}
    if isinstance(value, list):
        return [_undated(v) for v in value]
    return value


def unchanged(source: str, target: str) -> bool:
    """Whether ``target`` already holds ``source``: the same bytes, or, for JSON, the same
    content but for ``date`` fields."""
    if not os.path.exists(target):
        return False
    with open(source, "rb") as a, open(target, "rb") as b:
        old, new = b.read(), a.read()
    if old == new or not source.endswith(".json"):
        return old == new
    return _undated(json.loads(old)) == _undated(json.loads(new))


def import_records(workdir: str, study: str = STUDY) -> list[str]:
    """Copies the records of each of ``FOLDERS`` found in ``workdir`` into ``study`` (file times
    kept) where they are new or changed; returns the copied paths relative to ``study``."""
    copied = []
    for name in FOLDERS:
        source = os.path.join(workdir, name)
        if not os.path.isdir(source):
            continue
        for path in records(source):
            target = os.path.join(study, name, path)
            if unchanged(os.path.join(source, path), target):
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(os.path.join(source, path), target)
            copied.append(os.path.join(name, path))
    return copied


def main(argv=None, study: str = STUDY) -> int:
    """The command line; ``study`` is where the records go (docs/study; a test's own folder)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", help="the campaign's work folder")
    args = parser.parse_args(argv)
    present = [name for name in FOLDERS if os.path.isdir(os.path.join(args.workdir, name))]
    if not present:
        print(f"error: {args.workdir} has none of {', '.join(FOLDERS)}: give the folder "
              f"passed to experiments.campaign --workdir", file=sys.stderr)
        return 1
    copied = import_records(args.workdir, study)
    if not copied:
        print(f"no new records in {', '.join(present)}: nothing copied")
        return 0
    print(f"{len(copied)} records copied from {', '.join(present)}; now run "
          f"bash docs/study/make_tables.sh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
