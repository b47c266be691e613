"""python -m experiments.report WORKDIR...: where each run stands, and its metrics.png."""

from idm_jax.runs.tools import report_main as main

if __name__ == "__main__":
    main()
