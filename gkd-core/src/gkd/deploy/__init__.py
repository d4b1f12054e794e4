"""Deployment: the last process of the paper's workflow.

``gkd export`` (:mod:`gkd.deploy.export`) turns a run's student — the final one or a named
stage's — into a Hugging Face directory with a model card, optionally with an ONNX graph
(fp32 or dynamically int8-quantised), each checked against the gkd model
(:mod:`gkd.deploy.parity`); ``gkd eval`` (:mod:`gkd.deploy.evaluate`) measures an export's
accuracy or perplexity, throughput and batch-1 latency under PyTorch and onnxruntime.
ONNX needs the optional extra ``gkd-core[onnx]`` (:mod:`gkd.deploy.extras`).

Modules: ``source`` (where a run's student is), ``hf`` (write and reload with transformers),
``onnx_export`` (trace, quantise, run), ``parity`` (probe inputs, bounds), ``card`` (README.md),
``export`` (the whole export), ``evaluate`` (``gkd eval``), ``options`` and ``extras`` (light:
no torch).
"""
