"""The public names are the functions the issues fix, whatever submodules were imported first."""

import subprocess
import sys


def test_public_functions_are_callables_after_every_submodule_is_imported():
    import surgeon.api  # noqa: F401, E401
    import surgeon.capture.infer
    import surgeon.planning.planner
    import surgeon.runtime.transaction

    for name in ("apply", "plan", "roles", "save_pretrained", "load_adapter", "merge", "unmerge",
                 "merge_and_unload", "unload", "set_adapter", "disable_adapters", "delete_adapter",
                 "load_spec"):
        assert callable(getattr(surgeon, name)), name
    assert surgeon.roles is surgeon.infer_roles


def test_importing_surgeon_and_parsing_does_not_import_torch():
    code = ("import sys, surgeon; surgeon.load_spec('adapter default = lora(r=4) { target q }');"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
