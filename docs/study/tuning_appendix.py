"""The tuning grids of every method, one after another, for the appendix of RESULTS.md.

Reads ``docs/study/tune-ipc1/<method>/tuning.json`` (runs nothing, reads no data) and writes
``docs/study/tune-ipc1/grids.md``: per method, its grid as ``tuning.md`` tables it (validation
accuracy and gradient norms at iteration 0 per setting, the points past the grid's edge, the
choice and its test accuracy), or a line saying it is not tuned yet. With ``--results FILE`` it
also puts the grids in FILE's appendix section (its heading starts with ``APPENDIX``), in place of
the method sections there, and leaves the section's opening paragraphs and the rest of FILE as
they were. From the repository root:
``PYTHONPATH=. python docs/study/tuning_appendix.py [--results RESULTS.md]``.
"""

import argparse
import json
import os

from idm_jax.runs import checkpoint, tuning, tuning_report

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tune-ipc1")
METHODS = ("idm", "m3d", "dm", "ncfm", "iid")
APPENDIX = "## Appendix: the tuning grids"
METHOD_HEADING = "#### "   # one level under the appendix's "##" (RESULTS has no "###" there)


def appendix(root: str = ROOT) -> str:
    parts = []
    for method in METHODS:
        path = os.path.join(root, method, "tuning.json")
        if not os.path.exists(path):
            parts.append(f"{METHOD_HEADING}{method}\n\nNot tuned yet.\n")
            continue
        with open(path) as f:
            summary = with_terms_off(json.load(f), os.path.join(root, method))
        parts.append(f"{METHOD_HEADING}{method}\n\n{tuning_report.markdown(summary)}")
    return "\n".join(parts)


def with_terms_off(summary: dict, folder: str) -> dict:
    """``summary`` with each grid row's ``terms_off`` (the terms its run weighs 0) read from the
    row's own ``results.json`` in ``folder`` where the record predates that field."""
    for row in summary["grid"]:
        record = os.path.join(folder, tuning.trial_name(row["setting"]),
                              f"seed{summary['trial_seed']}", "results.json")
        if row.get("terms_off") is None and os.path.exists(record):
            with open(record) as f:
                config = json.load(f).get("config")
            row["terms_off"] = tuning_report.terms_off(config) if config else None
    return summary


def splice(document: str, grids: str) -> str:
    """``document`` with its appendix's method sections replaced by ``grids``.

    The appendix runs from the line that starts with ``APPENDIX`` to the next ``## `` heading
    (or the end); its method sections start at its first ``METHOD_HEADING`` line. Raises
    ValueError when the document has no such appendix, so nothing is written half-done.
    """
    lines = document.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith(APPENDIX)]
    if len(starts) != 1:
        raise ValueError(f"expected one line starting {APPENDIX!r}, found {len(starts)}")
    start = starts[0]
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
               len(lines))
    first = next((i for i in range(start + 1, end) if lines[i].startswith(METHOD_HEADING)), end)
    tail = "".join(lines[end:])
    body = grids.rstrip("\n") + "\n" + ("\n" if tail else "")
    return "".join(lines[:first]) + body + tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", help="a markdown file whose appendix gets the grids")
    args = parser.parse_args()
    if args.results and not os.path.isfile(args.results):
        parser.error(f"--results: no file {args.results}")
    text = appendix()
    spliced = None
    if args.results:                     # spliced before anything is written: all or nothing
        with open(args.results) as f:
            try:
                spliced = splice(f.read(), text)
            except ValueError as error:
                parser.error(f"--results: {error}")
    checkpoint.write_text(os.path.join(ROOT, "grids.md"), text)
    if spliced is not None:
        checkpoint.write_text(args.results, spliced)
    print(text)


if __name__ == "__main__":
    main()
