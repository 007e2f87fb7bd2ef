"""Runtime: the modules swapped into the host model, and the transaction that swaps them.

    base_kinds.py   each base layer kind's functional call and out-major weight view
    graph.py        the fx graph IR of a layer: node Builder, provenance tags, fast compile,
                    and `LayerView` (what graph code reads from a layer)
    method.py       `MethodRuntime`: what a method's layer part implements
    adapted.py      AdaptedLayer: a base layer plus its adapters, forward built by the passes
    forwards.py     an adapted layer's compiled forwards, one per layer state
    fold.py         the fold step: writing adapters into (and out of) the base weight
    saved.py        SavedModule: PEFT's modules_to_save wrapper
    tokens.py       TokenWrapper: PEFT's trainable token rows
    wrappers.py     the protocol every wrapper implements, the one walk over them, activation
    rows.py         one adapter per batch row (mixed-adapter batches)
    gathered.py     mixed-adapter LoRA batches as one gather-matmul per layer
    routing.py      the root hooks that route `model(..., adapter_names=...)` to the wrappers
    state.py        what adapters a model holds (State, Installed)
    transaction.py  prepare (read only) and commit (undoable) of an apply
"""
