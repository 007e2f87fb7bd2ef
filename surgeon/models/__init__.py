"""Models named on the command line: Hub ids, local folders, `tiny:<type>`, `minilm`, `py:`.

    load.py  resolve a model argument to a loaded module (one place for every command)
    tiny.py  shrink any transformers config to a tiny one
    layouts.py  other layouts of a synthesized input, read from the layer that consumes it
"""
