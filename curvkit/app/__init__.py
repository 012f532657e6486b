"""Applications on top of the library: the ``curvkit`` command, training runs and the report.

``cli`` dispatches the sub-commands; ``train`` runs optimiser comparisons; ``report``
computes the curvature report and ``report_html`` renders it; ``common`` holds the
helpers they share. Nothing below this package imports it.
"""
