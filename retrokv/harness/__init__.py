"""The harness: everything around the indexes that a user runs rather than imports into a model.

* :mod:`retrokv.harness.models` and :mod:`retrokv.harness.data`: the embedded SmolLM2 and built-in text;
* :mod:`retrokv.harness.eval`: synthetic retrieval tasks, perplexity, per-layer attention error;
* :mod:`retrokv.harness.analysis` and :mod:`retrokv.harness.sparsity`: how sparse real attention is;
* :mod:`retrokv.harness.demo` and :mod:`retrokv.harness.cli`: ``make demo`` and the ``retrokv`` command.

The harness sits on top of the layers below it (core indexes -> :mod:`retrokv.methods` ->
:mod:`retrokv.hf`) and nothing below imports it.
"""
