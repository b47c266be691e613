#!/usr/bin/env bash
# Redraw the fair comparison's tables and charts (issue #28) from the run records kept in
# docs/study; runs nothing and reads no data. From the repository root or anywhere:
#   bash docs/study/make_tables.sh
# IPC 1: the tuned methods beside the untuned study rows -> docs/study/tune-ipc1/comparison.*
# IPC 10: the study rows over every seed recorded -> docs/study/cpu-ipc10/study.* (always redrawn, so
# a mid-campaign copy of the records that brought the campaign's partial table is put right), and,
# once a tuned choice has been carried there on all its seeds (docs/study/tune-ipc10/<method>/tuning.json),
# the tuned methods beside them -> docs/study/tune-ipc10/comparison.*
# The head-start chart: each factor's mosaic beside the factor condensed -> docs/figures/head_start.png
# Every tuning grid, one after another -> docs/study/tune-ipc1/grids.md and the appendix of RESULTS.md
set -euo pipefail
cd "$(dirname "$0")/../.."
METHODS=idm,m3d,dm,ncfm,iid
python -m experiments.tune --compare "$METHODS" --workdir docs/study/tune-ipc1 \
  --baselines docs/study/cpu-ipc1:pf4,idm,ce-only-pf4,ce-only,random-real-pf4,random-real-pf3,random-real
ROWS10=idm,random-real,pf4,random-real-pf4,pf3,random-real-pf3,dm,random-real-plain
python -m experiments.study --ipc 10 --budget cpu --set validation_per_class=500 \
  --variants "$ROWS10" --seeds 0,1,2 --workdir docs/study/cpu-ipc10 --table_only
if compgen -G "docs/study/tune-ipc10/*/tuning.json" > /dev/null; then   # a finished carry
  python -m experiments.tune --compare "$METHODS" --workdir docs/study/tune-ipc10 \
    --baselines "docs/study/cpu-ipc10:$ROWS10"
fi
PYTHONPATH=. python docs/study/head_start_chart.py
PYTHONPATH=. python docs/study/tuning_appendix.py --results RESULTS.md > /dev/null
