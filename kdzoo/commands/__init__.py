"""What the ``kdzoo`` command line runs beside training, one module per
command: ``compare`` (suites; ``compare_jobs`` runs their jobs in other
processes or on a cluster; ``report`` writes their tables), ``evaluate``
(pretrained models on ``.bin`` sets and IJB), ``export`` (the student
backbone alone), ``bench`` (training speed; ``flops`` counts its FLOPs).
``kdzoo/cli.py`` parses arguments and calls them; ``kdzoo/engine`` holds
what a training run itself executes. ``kdzoo pack`` writes dataset files
with the writers in ``kdzoo.datasets.pack``.
"""
