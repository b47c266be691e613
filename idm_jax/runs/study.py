"""Studies: named variants x seeds on one dataset and budget, run one after another, aggregated.

Every run has its own work folder ``<workdir>/<variant>/seed<k>``, so a study resumes like a run:
a finished run (its ``results.json`` written with the same config) is skipped, an interrupted
one continues from its checkpoint. The aggregate is one table, mean +- population std over all
evaluation models of all seeds of a variant, written as ``study.md``, ``study.json`` and a bar
chart ``study.png`` with error bars.

Budgets: ``cpu`` is the CPU protocol: the preset of the IPC studied (its queue interval, CE
weight, ...) with batch_real 256, 100 iterations, meters reset every 100, 3 ConvNet-3 evaluation
models x 301 epochs, no intermediate evaluation. ``cpu-v1`` is the first study's protocol (groups
1 to 4 of RESULTS.md), which took the IPC 10 preset's queue settings at every IPC; it is kept so
that those records can still be tabled. ``paper`` keeps the preset's own settings
(accelerators).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import textwrap
import time
from typing import Callable, Optional, Sequence

import numpy as np

from idm_jax import config as config_lib
from idm_jax import methods
from idm_jax.runs import checkpoint, outputs
from idm_jax.config import Config
from idm_jax import presets

Transform = Callable[[Config], Config]


def _set(**fields) -> Transform:
    return lambda config: dataclasses.replace(config, **fields)


# The variants of README "Beyond IDM", in the order of the table. Each maps the budget's config
# to the variant's; none is tuned on the test set.
VARIANTS: dict[str, tuple[str, Transform]] = {
    "idm": ("faithful IDM", lambda c: c),
    "method": ("the method of --method at its own settings", lambda c: c),
    "random-real": ("the initial mosaic of random real images (0 iterations)",
                    _set(iterations=0)),
    "dm": ("DM: its optimiser and a fresh random extractor per iteration",
           lambda c: methods.with_method(c, "dm")),
    "no-pe": ("IDM without partition-and-expand (single-image init)",
              _set(partition_expand=False, init="real")),
    "no-queue-training": ("IDM without training the queue models", _set(model_train_steps=0)),
    "no-ce": ("IDM without the class-aware CE term", _set(syn_ce=False)),
    "gaussian": ("Gaussian-kernel MMD, median-heuristic bandwidth", _set(distance="gaussian")),
    "characteristic": ("characteristic-function distance, 1024 frequencies",
                       _set(distance="characteristic")),
    "covariance": ("IDM + covariance matching (weight 1)", _set(moment_weight=1.0)),
    # Weight 1 lets the covariance term outweigh the mean term 220 to 1 at iteration 0 on the
    # CPU protocol (RESULTS.md, group 3); 0.005 puts the two losses on one scale there.
    "covariance-balanced": ("IDM + covariance matching (weight 0.005: the two terms about "
                            "equal at the start)", _set(moment_weight=0.005)),
    "ce-only": ("IDM with the matching distance off: the class-aware CE term alone",
                _set(match_weight=0.0)),
    "ce-only-pf4": ("CE alone, partition factor 4", _set(match_weight=0.0, partition_factor=4)),
    "random-real-pf3": ("the initial mosaic at factor 3: 9 random real images per stored image "
                        "(0 iterations)", _set(iterations=0, partition_factor=3)),
    "random-real-pf4": ("the initial mosaic at factor 4: 16 random real images per stored image "
                        "(0 iterations)", _set(iterations=0, partition_factor=4)),
    "random-real-plain": ("random real images, no partition-and-expand (0 iterations)",
                          _set(iterations=0, partition_expand=False, init="real")),
    "pf1": ("partition factor 1 (no pieces, same optimiser)", _set(partition_factor=1)),
    "pf3": ("partition factor 3 (pieces of 11, 10, 11 pixels on 32)", _set(partition_factor=3)),
    "pf4": ("partition factor 4", _set(partition_factor=4)),
    "multiscale": ("each stored image whole and as its 2 x 2 pieces (5 per image)",
                   _set(partition="multiscale")),
    "nonuniform": ("a 2 x 2 grid cut at 0.4 of each side", _set(partition="nonuniform")),
}

# checkpoint_every changes no result: a run killed with its session resumes from the last 25.
CPU_PROTOCOL = dict(batch_real=256, iterations=100, eval_interval=100, num_eval=3,
                    epoch_eval_train=300, eval_every=0, model="ConvNet", eval_model="ConvNet",
                    checkpoint_every=25, record_grad_norms=True)


BUDGETS = ("cpu", "cpu-v1", "paper")


def budget_config(dataset: str, budget: str, ipc: int = 1,
                  overrides: Optional[dict] = None, method: str = "idm") -> Config:
    """The base config of a study: ``cpu`` (the CPU protocol on the preset of ``ipc``),
    ``cpu-v1`` (the first study's: the IPC 10 preset at any ``ipc``) or ``paper`` (the preset).

    In that order: the preset, the ``method``'s settings (``methods.with_method``), the
    budget's protocol, then ``overrides`` (field -> value or string).
    """
    if "method" in (overrides or {}):
        raise ValueError("choose the method with --method, not --set method=...: --method also "
                         "applies the method's own settings")
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; use one of {', '.join(BUDGETS)}")
    preset = presets.get_preset(f"{dataset}-ipc{10 if budget == 'cpu-v1' else ipc}")
    base = methods.with_method(preset, method)
    if budget != "paper":
        base = dataclasses.replace(base, **dict(CPU_PROTOCOL, ipc=ipc))
    return config_lib.override(base, overrides or {})


def variant_config(base: Config, variant: str, seed: int) -> Config:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    return dataclasses.replace(VARIANTS[variant][1](base), seed=seed)


def run_dir(workdir: str, variant: str, seed: int) -> str:
    return os.path.join(workdir, variant, f"seed{seed}")


def finished(directory: str, config: Config) -> Optional[dict]:
    """The results of a finished run with this config (up to ``config_lib.MECHANICS``; a field
    the saved config lacks, from an older version, counts as its default) and, for a method
    file, the same file contents; else None."""
    path = os.path.join(directory, "results.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            results = json.load(f)
        if not isinstance(results.get("accuracies"), list):
            raise ValueError("it holds no list of accuracies")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{path} is not a finished run's record ({err}); move it away or "
                         f"re-run that run") from None
    saved, defaults = results.get("config", {}), Config()
    same = all(saved.get(name, getattr(defaults, name)) == value
               for name, value in config.to_dict().items()
               if name not in config_lib.MECHANICS)
    if same and methods.is_file(config.method):
        # A method file edited since that run is another method under the same name.
        ran = (results.get("method") or {}).get("method_sha256")
        same = ran == methods.provenance(config.method)["method_sha256"]
    return results if same else None


def machine() -> dict:
    """The processor and the flags that change CPU speed, the commit, the date."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        commit = ""
    return dict(outputs.processor(), commit=commit or "?", date=time.strftime("%Y-%m-%d %H:%M"))


# The header keys that ``machine()`` stamps: when and where a table was drawn, not what it says.
TABLING = ("cpu", "cpu_flags", "cores", "commit", "date")


def write_tables(workdir: str, stem: str, table: list[dict], header: dict,
                 render: Callable[[dict], str], chart: Callable[[str], None]) -> bool:
    """Write ``<stem>.md`` (``render(header)``), ``<stem>.json`` and the chart ``<stem>.png``
    (``chart(path)``) into ``workdir``, unless the files there already say the same.

    "The same" means: drawn again under the stamp (``TABLING``) already in ``<stem>.json``, the
    Markdown and JSON come out byte for byte as they are, and the chart exists. A redraw from the
    same records then leaves every file, and the repository, as it was; any other change (a
    record, a row, a line of the Markdown's wording) writes all three under the new stamp.
    Returns whether anything was written.
    """
    md, js, png = (os.path.join(workdir, f"{stem}.{ext}") for ext in ("md", "json", "png"))

    def as_json(head: dict) -> str:
        return json.dumps({"header": head, "table": table}, indent=2)

    try:
        with open(md) as f:
            old_md = f.read()
        with open(js) as f:
            old_json = f.read()
        before = json.loads(old_json)["header"]
    except (OSError, ValueError, KeyError, TypeError):
        before = None     # no table yet, or not one this writer drew: draw it
    if isinstance(before, dict) and os.path.exists(png):
        kept = dict(header, **{k: before[k] for k in TABLING if k in before})
        if render(kept) == old_md and as_json(kept) == old_json:
            return False
    os.makedirs(workdir, exist_ok=True)
    checkpoint.write_text(md, render(header))
    checkpoint.write_text(js, as_json(header))
    chart(png)
    return True


def provenance(rows: dict[str, list[dict]]) -> dict:
    """Where the tabled runs were made, from their own records: commits, devices, processors
    and the first and last date (a record from before a field was kept says "not recorded")."""
    records = [r for results in rows.values() for r in results]
    dates = sorted(r.get("date", "?") for r in records)
    return {"commits": sorted({r.get("code_version", "?") for r in records}),
            "devices": sorted({r.get("device", "?") for r in records}),
            "processors": sorted({r.get("processor", {}).get("cpu", "not recorded")
                                  for r in records}),
            "dates": [dates[0], dates[-1]] if dates else []}


def stats(results: list[dict]) -> dict:
    """The runs of one row (seeds) pooled: mean +- population std over every model of every
    seed, on test and, over the runs that held out a validation split, on validation (None
    when none did); seeds, models and each seed's mean."""
    accuracies = np.array([a for r in results for a in r["accuracies"]], np.float64)
    held_out = np.array([a for r in results for a in r.get("validation", {}).get(
        "accuracies", [])], np.float64)
    return {"seeds": len(results), "models": int(accuracies.size),
            "mean": float(accuracies.mean()), "std": float(accuracies.std()),
            "seed_means": [float(np.mean(r["accuracies"])) for r in results],
            "validation_mean": float(held_out.mean()) if held_out.size else None,
            "validation_std": float(held_out.std()) if held_out.size else None}


def condense_seconds(results: dict) -> float:
    """A run's condensing time: every session of a resumed run (``condense_seconds``); older
    records kept only their last session's."""
    return float(results.get("condense_seconds",
                             results.get("condense_seconds_this_session", 0.0)))


def aggregate(rows: dict[str, list[dict]]) -> list[dict]:
    """One line per variant: ``stats`` of its seeds, its wall time and device."""
    table = []
    for variant, results in rows.items():
        table.append(dict(
            stats(results), variant=variant, what=VARIANTS[variant][0],
            wall_seconds=float(sum(condense_seconds(r) + r.get("eval_seconds", 0.0)
                                   for r in results)),
            device=results[0].get("device", "?")))
    return table


def cell(mean: Optional[float], std: Optional[float]) -> str:
    """``mean +- std`` to 2 decimals, ``-`` when there is no value."""
    return "-" if mean is None else f"{mean:.2f} +- {std:.2f}"


def runs_line(runs: dict) -> str:
    """Where tabled runs were made (``provenance``), as one sentence."""
    return (f"Runs made {' to '.join(runs['dates'])} on commits "
            f"{', '.join(f'`{c}`' for c in runs['commits'])}, {'; '.join(runs['devices'])}, "
            f"processors: {'; '.join(runs['processors'])}.")


def markdown(table: list[dict], header: dict) -> str:
    lines = [f"Study on {header['dataset']}, budget `{header['budget']}`, tabled "
             f"{header['date']}, commit `{header['commit']}`, {header['cpu']} "
             f"({', '.join(header['cpu_flags'])}; {header['cores']} cores).",
             f"Command: `{header['command']}`"]
    runs = header.get("runs")
    if runs:
        lines.append(runs_line(runs))
    lines += ["",
             "| variant | what | test accuracy (%) | validation (%) | seeds x models | "
             "per-seed means | wall time |",
             "|---|---|---|---|---|---|---|"]
    for row in table:
        lines.append(f"| `{row['variant']}` | {row['what']} | {row['mean']:.2f} +- "
                     f"{row['std']:.2f} | {cell(row['validation_mean'], row['validation_std'])} | "
                     f"{row['seeds']} x {row['models'] // row['seeds']} | "
                     f"{', '.join(f'{m:.1f}' for m in row['seed_means'])} | "
                     f"{row['wall_seconds'] / 60:.0f} min |")
    return "\n".join(lines) + "\n"


def bar_chart(table: list[dict], path: str, title: str,
              colors: Optional[Sequence[str]] = None) -> None:
    """A PNG bar chart of the table's means with population-std error bars, each bar named
    with its number of seeds (``colors``: one per row; blue for all by default)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(table) + 1.5), 3.6), dpi=120)
    # Rows of one chart may stand on different numbers of seeds: each bar says how many.
    names = [f"{row['variant']}\n{row['seeds']} seed{'s' if row['seeds'] != 1 else ''}"
             for row in table]
    ax.bar(names, [row["mean"] for row in table], yerr=[row["std"] for row in table],
           capsize=4, color=list(colors) if colors else "#4c72b0")
    for i, row in enumerate(table):
        ax.text(i, row["mean"] + row["std"] + 0.3, f"{row['mean']:.1f}", ha="center",
                fontsize=8)
    low = min(row["mean"] - row["std"] for row in table)
    ax.set_ylim(max(0.0, low - 5.0), max(row["mean"] + row["std"] for row in table) + 3.0)
    ax.set_ylabel("test accuracy (%)")
    # A narrow chart (few variants) would clip a long title: wrap it to the figure's width.
    ax.set_title(textwrap.fill(title, width=int(12 * fig.get_figwidth())), fontsize=9)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def finished_runs(workdir: str, variants: Sequence[str], seeds: Sequence[int], *,
                  dataset: str = "cifar10", budget: str = "cpu", ipc: int = 1,
                  overrides: Optional[dict] = None,
                  method: str = "idm") -> tuple[dict[str, list[dict]], list[str]]:
    """The results of every finished run of the grid in ``workdir``, read, never run.

    Returns ``(rows, missing)``: ``rows`` maps each variant with at least one finished seed to
    its results (in seed order), ``missing`` names the runs not finished (``"gaussian seed 2"``).
    Only the run records are needed (``<variant>/seed<k>/results.json``), so a table can be
    rebuilt from records copied off another machine.
    """
    base = budget_config(dataset, budget, ipc, overrides, method)
    rows: dict[str, list[dict]] = {}
    missing = []
    for variant in variants:
        for seed in seeds:
            results = finished(run_dir(workdir, variant, seed), variant_config(base, variant, seed))
            if results is None:
                missing.append(f"{variant} seed {seed}")
            else:
                rows.setdefault(variant, []).append(results)
    return rows, missing


def write_table(rows: dict[str, list[dict]], workdir: str, *, dataset: str, budget: str = "cpu",
                ipc: int = 1, overrides: Optional[dict] = None, command: str = "",
                missing: Sequence[str] = ()) -> list[dict]:
    """Aggregate ``rows`` and write ``study.md``, ``study.json`` and ``study.png`` into
    ``workdir`` (left as they are when only their stamp would change: ``write_tables``);
    ``missing`` (runs with no record) is listed under the table. Returns the table."""
    table = aggregate(rows)
    header = dict(machine(), dataset=dataset, budget=budget, ipc=ipc, command=command,
                  overrides=dict(overrides or {}), missing=list(missing), runs=provenance(rows))
    # A grid may name runs that were never planned (a third seed for some variants only), so
    # the line says what is known: no record, not that a run is under way.
    note = ("\nNo record (not run, or not finished), so not in the table: "
            f"{', '.join(missing)}.\n") if missing else ""
    write_tables(workdir, "study", table, header, lambda h: markdown(table, h) + note,
                 lambda path: bar_chart(table, path, f"{dataset} IPC {ipc}, budget {budget}: "
                                                     "mean +- std over seeds x models"))
    return table


def run_study(dataset, variants: Sequence[str], seeds: Sequence[int], workdir: str, *,
              budget: str = "cpu", ipc: int = 1, overrides: Optional[dict] = None, mesh=None,
              quiet: bool = False, command: str = "", method: str = "idm") -> list[dict]:
    """Run every (variant, seed) not yet finished, then write the aggregate; returns the table.

    ``dataset`` is a loaded ``idm_jax.data.Dataset``.
    """
    from idm_jax.runs import run as run_lib

    base = budget_config(dataset.name, budget, ipc, overrides, method)
    # Seed by seed, so that an interrupted study already holds every variant at the first seeds.
    configs = {(v, s): variant_config(base, v, s) for s in seeds for v in variants}  # validates
    rows: dict[str, list[dict]] = {v: [] for v in variants}
    for number, ((variant, seed), config) in enumerate(configs.items(), 1):
        directory = run_dir(workdir, variant, seed)
        results = finished(directory, config)
        if results is None:
            print(f"== study run {number}/{len(configs)}: {variant} seed {seed} -> {directory}")
            results = run_lib.condense_and_evaluate(config, dataset, directory, mesh=mesh,
                                                    quiet=quiet)
        else:
            print(f"== study run {number}/{len(configs)}: {variant} seed {seed} done "
                  f"({results['mean']:.2f} %), skipped")
        rows[variant].append(results)
    return write_table(rows, workdir, dataset=dataset.name, budget=budget, ipc=ipc,
                       overrides=overrides, command=command)


__all__ = ["VARIANTS", "CPU_PROTOCOL", "BUDGETS", "budget_config", "variant_config", "run_dir",
           "finished", "finished_runs", "machine", "TABLING", "write_tables", "provenance",
           "stats", "aggregate", "cell",
           "runs_line", "markdown",
           "bar_chart", "write_table", "run_study"]
