"""The lists of names the command line offers, each kept here and nowhere else.

The modules that implement the names import torch; the command line must list them without it
(``lota --help`` loads no torch). So each list lives here, in a module that imports nothing, and
both sides read it: the options list it in their help and checks, the implementing module builds
or checks its registry against it.
"""

from __future__ import annotations

# ``lota adapt --optimizer``: the optimizers ``train.make_optimizer`` builds
OPTIMIZERS = ("adamw", "rmsprop", "sgd")

# ``lota merge --method``: the methods ``merge_methods`` registers with ``@merge_method``, sorted
MERGE_METHODS = (
    "add",
    "breadcrumbs",
    "dare-linear",
    "dare-ties",
    "della",
    "stack",
    "task-arithmetic",
    "ties",
)

# ``lota mask --selector``: the selectors ``selection`` registers with ``@selector``
SELECTORS = ("magnitude", "bottomk", "random")

# ``lota eval --metric``: the metrics ``evaluate`` registers with ``@metric``, then ``choice``
# (multiple choice by log-likelihood, ``lota.choice``)
METRICS = ("answer", "exact", "contains", "choice")

# ``lota ks --correction`` and ``--mode``: multiple-testing corrections, p-value modes (as scipy)
KS_CORRECTIONS = ("none", "bonferroni", "bh")
KS_MODES = ("auto", "exact", "asymp")

# ``--dtype``: the precisions a model loads in (``auto``: the checkpoint's own)
LOAD_DTYPES = ("auto", "float32", "bfloat16", "float16")

# ``--values-dtype``: the precisions a delta's values are stored in
VALUE_DTYPES = ("float32", "bfloat16", "float16")
