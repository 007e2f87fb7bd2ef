"""Capture: the model as a dataflow graph, and each adaptable layer's role read from it.

    graph.py      torch.export (meta device, repeated blocks captured once) -> fx graph
    inputs.py     example inputs synthesised from a transformers config
    flow.py       node kinds and projection owners in the captured graph
    attention.py  q/k/v/o from the score and value matmuls (or sdpa)
    mlp.py        up/gate/down from the nonlinearity and the gating product
    experts.py    `@moe.up`/`@moe.down`: MoE expert stacks (3-D parameters) by the MLP rules
    reach.py      layers the captured forward never calls (their adapters would never run)
    infer.py      `infer_roles(model)`: the roles, with the evidence that decided each;
                  `analyse(model)`: those, the expert stacks' roles and reach, from one capture
    names.py      the role vocabulary (torch-free: the language checks role names with it)

Named `capture`, not `roles`, because `surgeon.roles` is the public function.
"""
