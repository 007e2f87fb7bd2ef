"""How a surgeon-adapted model meets the tools people already use.

    transformers.py  transformers' adapter protocol on the model instance, so `save_pretrained`,
                     Trainer checkpoints and sentence-transformers' `save` write PEFT folders,
                     and `load_state_dict` of such a folder (Trainer's resume) restores them
    hub.py           adapter ids on the Hugging Face Hub -> local folders (offline-aware)
    peft_layers.py   whether a model already holds peft's own adapter layers (then refused)

`transformers.py` and `hub.py` sit between the runtime and `surgeon.api` (the API calls them,
never the reverse); `peft_layers.py` is a leaf the planner asks.
"""
