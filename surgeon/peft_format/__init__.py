"""The PEFT file format: the only place that knows PEFT's layout.

    fields.py      what each PEFT config field is (option, selector, bookkeeping)
    patterns.py    target_modules / rank_pattern regexes <-> selectors
    read.py        adapter_config.json -> Spec
    write.py       Spec (+ planned sites) -> adapter_config.json
    config.py      the public face of read/write
    checkpoint.py  checkpoint keys: model keys <-> PEFT's, validated against the model
    files.py       file names, adapter folders, safetensors reads, atomic writes
"""
