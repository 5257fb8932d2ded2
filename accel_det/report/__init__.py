"""A run looked at: ``plots/`` (results, pr_curve, confusion_matrix, labels, val_predictions) and ``report.html``.

``plots.py`` draws figures from plain data, ``history.py`` reads metrics.jsonl back, ``build.py`` gathers what
a run holds and writes everything, ``html.py`` the page, ``hook.py`` the end-of-training hook and ``cli.py``
``accel-det report`` (``python -m accel_det.report``). Nothing heavy is imported here: the engine imports the hook.
"""
