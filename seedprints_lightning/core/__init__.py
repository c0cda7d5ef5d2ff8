"""The Lightning-free core: probes, the lineage test, verdicts, controls, the custody chain and its ledger.

Nothing here imports a trainer, a face or the command line (``tests/test_layout.py`` checks it).
"""
