"""``make demo``: every paper's main experiment on bundled data, one markdown report.

Each part is a module with ``run(out_dir, quick) -> str`` returning its report section;
``python -m lightning_losses.demo`` runs them in order and writes ``<out>/report.md``.
"""
