"""GLD's closed forms against exact Gromov-Wasserstein: speed (time vs n) and agreement (rank correlation).

Run ``python -m benchmarks.gw_compare --quick`` (under 2 minutes on 2 CPU cores) or without ``--quick`` for the
full run recorded in ``benchmarks/RESULTS.md``. See :mod:`benchmarks.gw_compare.harness` for what is measured.
"""
