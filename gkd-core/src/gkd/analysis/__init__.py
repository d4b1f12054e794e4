"""Reading recorded runs: the feature-distance analysis of ``gkd analyze`` (the paper's App. A.2).

:mod:`gkd.engine.analysis` records, during training, the distances between the teachers' and the
student's features at a fixed schedule (``analysis.jsonl``); this package reads run directories
and needs neither torch nor a model:

* :mod:`gkd.analysis.records` — the record format, shared with the recorder;
* :mod:`gkd.analysis.correlate` — correlations of each distance with the training loss and the
  task metric, and the comparison of two runs (scipy, the ``analysis`` extra);
* :mod:`gkd.analysis.figures` — heat maps (feature kind × layer) and per-stage loss curves.
"""
