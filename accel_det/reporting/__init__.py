"""A run looked at: ``plots/`` (results, pr_curve, confusion_matrix, labels, val_predictions) and ``report.html``.

``plots.py`` draws figures from plain data, ``history.py`` reads metrics.jsonl back, ``build.py`` gathers what
a run holds and writes everything, ``html.py`` the page. Nothing here imports the engine: the end-of-training hook
(engine/report_hook.py) and ``accel-det report`` (accel_det/report.py) import this package, not the reverse.
"""
