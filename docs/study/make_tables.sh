#!/usr/bin/env bash
# Redraw the fair comparison's tables and charts (issue #28) from the run records kept in
# docs/study; runs nothing and reads no data. From the repository root or anywhere:
#   bash docs/study/make_tables.sh
# IPC 1: the tuned methods beside the untuned study rows -> docs/study/tune-ipc1/comparison.*
# IPC 10: the same at IPC 10 once a tuned choice has been carried there on all its seeds
# (docs/study/tune-ipc10/<method>/tuning.json), else the study rows alone -> docs/study/cpu-ipc10/study.*
# The head-start chart: each factor's mosaic beside the factor condensed -> docs/figures/head_start.png
# Every tuning grid, one after another (the appendix of RESULTS.md) -> docs/study/tune-ipc1/grids.md
set -euo pipefail
cd "$(dirname "$0")/../.."
METHODS=idm,m3d,dm,ncfm,iid
python -m experiments.tune --compare "$METHODS" --workdir docs/study/tune-ipc1 \
  --baselines docs/study/cpu-ipc1:pf4,idm,ce-only-pf4,ce-only,random-real-pf4,random-real-pf3,random-real
ROWS10=idm,random-real,pf4,random-real-pf4,pf3,random-real-pf3,dm,random-real-plain
if compgen -G "docs/study/tune-ipc10/*/tuning.json" > /dev/null; then   # a finished carry
  python -m experiments.tune --compare "$METHODS" --workdir docs/study/tune-ipc10 \
    --baselines "docs/study/cpu-ipc10:$ROWS10"
else
  python -m experiments.study --ipc 10 --budget cpu --set validation_per_class=500 \
    --variants "$ROWS10" --seeds 0,1,2 --workdir docs/study/cpu-ipc10 --table_only
fi
PYTHONPATH=. python docs/study/head_start_chart.py
PYTHONPATH=. python docs/study/tuning_appendix.py > /dev/null
