"""`plan` and `roles` on models of every MODEL form, and the ways a MODEL argument goes wrong.

Oracles: LoRA parameter counts are r * (in + out) (math); the q/v sites planned by role on a
llama are the modules PEFT's own default table names for llama.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.runner import EXAMPLES, REPO, assert_user_error, listing, surgeon

FACTORIES = REPO / "tests" / "cli" / "factories.py"
TINY_NET = f"py:{FACTORIES}:tiny_net"

MLP_SPEC = """\
adapter default = lora(r=4, alpha=8) {
    target fc1, fc2 in layers[0]
    rank 2 on fc2
    alpha 3 on head
}
"""


def test_plan_on_a_python_factory(tmp_path: Path):
    (tmp_path / "mlp.peft").write_text(MLP_SPEC)
    text = surgeon("plan", "mlp.peft", "--model", TINY_NET, "--input", "2x16:float32", cwd=tmp_path)
    assert text.rc == 0, text
    assert "layers.0.fc1" in text.out and "layers.1.fc1" not in text.out, text
    warnings = [line for line in text.out.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "mlp.peft:4:5:" in warnings[0] and "head" in warnings[0], text
    as_json = surgeon("plan", "mlp.peft", "--model", TINY_NET, "--json", cwd=tmp_path)
    assert as_json.rc == 0, as_json
    plan = json.loads(as_json.out)
    sites = {s["path"]: (s["r"], s["params"]) for s in plan["sites"]}
    # LoRA adds r * (in + out): fc1 is 16 -> 32 at r=4, fc2 is 32 -> 16 at r=2
    assert sites == {"layers.0.fc1": (4, 4 * 48), "layers.0.fc2": (2, 2 * 48)}
    assert plan["trainable_params"] == 6 * 48
    assert plan["model_params"] == 2 * (16 * 32 + 32 + 32 * 16 + 16) + 16 * 4 + 4
    assert listing(tmp_path) == ["mlp.peft"]  # a dry run writes nothing


def test_plan_by_role_on_tiny_llama_matches_peft_default_targets(tmp_path: Path):
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as TABLE

    result = surgeon("plan", EXAMPLES / "lora_qv.peft", "--model", "tiny:llama", "--json", cwd=tmp_path)
    assert result.rc == 0, result
    paths = [s["path"] for s in json.loads(result.out)["sites"]]
    assert len(paths) == 2 * len(TABLE["llama"])  # two layers in a tiny model
    assert {p.rsplit(".", 1)[-1] for p in paths} == set(TABLE["llama"])


def test_roles_lists_every_adaptable_layer(tmp_path: Path):
    result = surgeon("roles", "--model", TINY_NET, "--input", "2x16", "--json", cwd=tmp_path)
    assert result.rc == 0, result
    rows = json.loads(result.out)["layers"]
    paths = ["layers.0.fc1", "layers.0.fc2", "layers.1.fc1", "layers.1.fc2", "head"]
    assert [r["path"] for r in rows] == paths
    assert all(r["kind"] == "Linear" and r["role"] and r["evidence"] for r in rows), rows
    table = surgeon("roles", "--model", TINY_NET, cwd=tmp_path)
    assert table.rc == 0 and "layers.0.fc1" in table.out and "5 adaptable layers" in table.out, table


def test_spec_errors_against_a_model_are_rendered_diagnostics(tmp_path: Path):
    (tmp_path / "typo.peft").write_text("adapter default = lora(r=4) {\n    target fc3\n}\n")
    result = surgeon("plan", "typo.peft", "--model", TINY_NET, cwd=tmp_path)
    assert_user_error(result, "typo.peft:2:5: error:", "`target fc3` matches no module", "^^^",
                      "did you mean")
    assert not result.err.startswith("surgeon: error:"), result


def test_model_argument_failures_are_one_clear_line(tmp_path: Path, capsys, monkeypatch):
    """Every MODEL form's failure, through `main()` in this process (the subprocess path of the
    same code is covered above and by the Hub case below)."""
    from surgeon.cli.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "mlp.peft").write_text(MLP_SPEC)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    cases = {
        "tiny:nosuchtype": "transformers has no model type 'nosuchtype'",
        "./missing-dir": "no such directory",
        "adapter": "holds a PEFT adapter",
        f"py:{FACTORIES}:not_a_module": "returned int, not a torch.nn.Module",
        f"py:{FACTORIES}:broken": "broken() raised RuntimeError: the factory failed on purpose",
        "py:no_such_package.models:build": "cannot import 'no_such_package.models'",
        f"py:{FACTORIES}:missing": "has no callable 'missing'",
    }
    for model, message in cases.items():
        rc = main(["plan", "mlp.peft", "--model", model])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, (model, err)


def test_hub_id_offline_is_one_clear_line(tmp_path: Path):
    (tmp_path / "mlp.peft").write_text(MLP_SPEC)
    result = surgeon("plan", "mlp.peft", "--model", "someone/some-model", cwd=tmp_path)
    assert_user_error(result, "someone/some-model", "HF_HUB_OFFLINE is set", "not in the local cache")
    assert len(result.err.strip().splitlines()) == 1, result
