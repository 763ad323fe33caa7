"""PD disaggregation: the transfer contract (`transfer`), and the control plane and pipelines
that every transfer backend shares (DESIGN.md §3).

Nothing is imported here, so `import pdcore.disagg.transfer` stays light (no torch).
"""
