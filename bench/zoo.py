"""Zoo sweep: every `tiny:<type>` transformers can build, run, and its roles inferred.

A benchmark, not a test (the whole zoo takes tens of minutes on two cores; CI runs a fixed
sample in tests/roles/test_zoo_sample.py). Each type is one row: does the tiny model build, does
it run its own forward on the synthesized inputs, are roles computed (or refused, with why), how
many layers each role family got, and whether the roles agree with the conventional names
(`q_proj` is a query, `down_proj` a down projection) where a module's name plainly says one.

Results are appended to a JSONL cache, one line per type, so the sweep runs in shards and
resumes after an interruption; `--report` turns the cache into docs/zoo.md.

    python bench/zoo.py --shard 0/2 --budget 1800      # two shells, one per shard
    python bench/zoo.py --shard 1/2 --budget 1800
    python bench/zoo.py --report                        # writes docs/zoo.md
    python bench/zoo.py --types llama,t5 --fresh        # a few types, ignoring the cache
    python bench/zoo.py --only llama t5 --fresh         # the same
    python bench/zoo.py --sample 200 --cache /tmp/s.jsonl   # a fixed random sample (seed 0)
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = Path("/tmp/surgeon-zoo.jsonl")
REPORT = ROOT / "docs" / "zoo.md"
FAMILIES = ("attn", "xattn", "mlp", "mixer", "moe", "embed", "head", "other")
# Last name segment -> the role part it plainly names. Ambiguous names are left out on purpose:
# `gate` is a router in Mixtral, `in_proj` a fused qkv in DeBERTa but a mixer input in Mamba,
# `w1/w2/w3` differ between codebases.
CONVENTIONAL: dict[str, str] = {
    **dict.fromkeys(("q_proj", "query", "q", "to_q", "query_proj", "q_lin", "wq"), "q"),
    **dict.fromkeys(("k_proj", "key", "k", "to_k", "key_proj", "k_lin", "wk"), "k"),
    **dict.fromkeys(("v_proj", "value", "v", "to_v", "value_proj", "v_lin", "wv"), "v"),
    **dict.fromkeys(("qkv_proj", "qkv", "query_key_value", "wqkv", "c_attn", "to_qkv"), "qkv"),
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "gate_up_proj": "gate_up",
}
_ATTN_PARTS = ("q", "k", "v", "qkv")
# Where a module's name says one part and the model's code computes another, the role follows the
# code and the report says why (model types, path pattern, the role kept, the reason; "" types:
# any). A disagreement matched here is counted apart, never as agreement; a role that changes no
# longer matches its note.
NAME_NOTES: tuple[tuple[str, str, str, str], ...] = (
    ("pp_doclayout_v4", r"global_pointer\.[qk]_proj$", "head",
     "a global pointer: its q.k scores are the reading-order logits (the output); no values weighed"),
    ("", r"\.indexer\.wk$", "other",
     ("a sparse-attention indexer's key (DeepSeek-V3.2 DSA): its relu'd scores only pick tokens by "
     "topk, no values are weighed")),
    ("timesfm", r"\.mlp\.gate_proj$", "mlp.up",
     "TimesFM's MLP is `down(relu(gate_proj(x)))`: the only input projection, nothing gated"),
    ("sam3.*", r"dot_product_scoring\.query_proj$", "head",
     ("SAM 3's scoring head: a query-prompt dot product gives the class logits; no values weighed")),
    ("deepseek_v4", r"compressor\.(indexer\.)?gate_proj$", "other",
     ("DeepSeek-V4's KV compressor: softmax pooling weights over a window of `kv_proj` rows, not an "
     "MLP gate")),
    ("rwkv", r"feed_forward\.key$", "mlp.up", "RWKV's channel mix `value(relu(key(x))^2)`: an MLP's up"),
    ("rwkv", r"feed_forward\.value$", "mlp.down", "RWKV's channel mix: an MLP's down"),
    ("rwkv", r"attention\.(key|value)$", "other",
     ("RWKV's time mix: a decaying weighted average with no query (receptance gates its output): no "
     "scores between two activations")),
    ("mra", r"attention\.self\.(query|key|value)$", "other",
     ("transformers' MRA attention without its CUDA kernel (any CPU run) returns `zeros_like(query)`: "
      "q, k and v reach nothing in the captured call; with the kernel, an opaque custom op")),
    ("zaya", r"mlp\.gate\.down_proj$", "other",
     ("ZAYA's router: `down_proj` shrinks the hidden state for the router's own MLP, whose last "
      "layer is the `moe.router`; no MLP's down")),
    ("zaya", r"qkv_proj\.[qk]_proj$", "attn.qkv",
     ("ZAYA's compressed convolutional attention mixes q and k (query = conv(cat(q, k)) + (q + k) / 2): "
     "each feeds both; there is no `attn.qk` role")),
)


class _Timeout(BaseException):
    """Not an Exception: capture's and the model's own broad `except Exception` must not swallow it."""


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout("timed out")


def all_types() -> list[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return sorted(CONFIG_MAPPING_NAMES)


def sample(types: list[str], size: int | None) -> list[str]:
    """`size` types drawn with a fixed seed (the same sample on every run), in sorted order."""
    if size is None or size >= len(types):
        return types
    return sorted(random.Random(0).sample(types, size))


def _why(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def sweep_one(model_type: str, row: dict[str, Any] | None = None) -> dict[str, Any]:
    """One row: build, run, roles, name agreement. Never raises (but for the sweep's timeout;
    `row`, filled as the stages pass, then says how far it got)."""
    import torch

    from surgeon.capture.synthesize import input_candidates
    from surgeon.models.load import load_model

    row = {"type": model_type} if row is None else row
    start = time.perf_counter()
    try:
        model = load_model(f"tiny:{model_type}").model
    except Exception as error:  # noqa: BLE001 - a sweep reports every failure
        row.update(built=False, why=_why(error))
        return row
    row["built"] = True
    row["class"] = type(model).__name__
    row.update(runs=False, why=_no_call(model))
    errors = []
    for inputs in input_candidates(model, "cpu"):  # as capture tries them: most complete first
        try:
            args, kwargs = inputs.split(inputs.flat())
            with torch.no_grad():
                model(*args, **kwargs)
            row.update(runs=True, why="")
            break
        except Exception as error:  # noqa: BLE001
            errors.append(_why(error))
            # The most complete call's error says most; later calls drop inputs or reshape them.
            row.update(runs=False, why=errors[0])
    row.update(_roles_row(model, model_type))
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _no_call(model: Any) -> str:
    """Why no call was tried: the model has no forward, or which required inputs no maker knows."""
    from torch import nn

    from surgeon.capture.synthesize import missing_inputs

    if type(model).forward is nn.Module.forward:
        return f"no forward: {type(model).__name__} is used through other methods (encode, generate)"
    missing = missing_inputs(model)
    if missing:
        return "no inputs synthesized: no maker for required " + ", ".join(missing)
    return "no inputs synthesized: the forward takes none of the known inputs"


def _roles_row(model: Any, model_type: str = "") -> dict[str, Any]:
    from surgeon.capture.infer import infer_roles

    try:
        roles = infer_roles(model)
    except Exception as error:  # noqa: BLE001
        return {"roles": False, "roles_why": _why(error)}
    counts: dict[str, int] = {}
    for role in roles.values():
        family = str(role).partition(".")[0]
        counts[family] = counts.get(family, 0) + 1
    uncertain = sorted({getattr(r, "uncertain", None) or "" for r in roles.values()} - {""})
    named, doubted, wrong, noted = 0, 0, [], {}
    for path, role in roles.items():
        part = CONVENTIONAL.get(path.rsplit(".", 1)[-1].lower())
        if part is None:
            continue
        if role.uncertain:  # refused, not guessed: role selectors fail on it (exit 2)
            doubted += 1
            continue
        named += 1
        if not agrees(part, str(role)):
            wrong.append(f"{path}={role}")
            why = name_note(model_type, path, str(role))
            if why:
                noted[path] = why
    return {"roles": True, "families": counts, "uncertain": uncertain, "named": named,
            "named_uncertain": doubted, "disagree": wrong[:5], "n_disagree": len(wrong),
            "n_explained": len(noted), "explained": sorted(set(noted.values()))}


def name_note(model_type: str, path: str, role: str) -> str:
    """Why the name misleads, when NAME_NOTES says so for this type, path and this very role."""
    return next((why for types, pattern, kept, why in NAME_NOTES if kept == role
                 and re.fullmatch(types or ".*", model_type) and re.search(pattern, path)), "")


def agrees(part: str, role: str) -> bool:
    family, _, have = role.partition(".")
    if part in _ATTN_PARTS:
        return family in ("attn", "xattn") and have == part
    if part == "gate" and family in ("attn", "xattn"):  # gated attention: its output gate
        return have == "gate"
    return family == "mlp" and have == part


def run_sweep(types: list[str], cache: Path, budget: float, per_type: int, fresh: bool) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    done = set() if fresh else {r["type"] for r in read_cache(cache)}
    signal.signal(signal.SIGALRM, _alarm)
    deadline = time.monotonic() + budget
    for model_type in types:
        if model_type in done:
            continue
        if time.monotonic() > deadline:
            print("budget spent; run again to resume", flush=True)
            return
        signal.alarm(per_type)
        row: dict[str, Any] = {"type": model_type}
        try:
            sweep_one(model_type, row)
        except _Timeout:  # a failure of the stage it reached, counted as such (never dropped)
            reason = f"timed out after {per_type} s"
            row.setdefault("built", False)
            if row["built"]:
                row.setdefault("runs", False)
                row.update(roles=False, roles_why=reason)
            row["why"] = row.get("why") or reason
        finally:
            signal.alarm(0)
        with cache.open("a") as out:
            out.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def read_cache(cache: Path) -> list[dict[str, Any]]:
    if not cache.exists():
        return []
    rows: dict[str, dict[str, Any]] = {}
    for line in cache.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["type"]] = row  # the last run of a type wins
    return [rows[t] for t in sorted(rows)]


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    built = [r for r in rows if r.get("built")]
    runs = [r for r in built if r.get("runs")]
    computed = [r for r in runs if r.get("roles")]
    named = [r for r in computed if r.get("named")]
    agree = [r for r in named if not r.get("n_disagree")]
    explained = [r for r in named if r.get("n_disagree") and r.get("n_explained") == r["n_disagree"]]
    pct = lambda a, b: f"{100 * len(a) / len(b):.1f}%" if b else "-"
    return {"types": len(rows), "built": len(built), "runs": len(runs), "runs_pct": pct(runs, built),
            "roles": len(computed), "roles_pct": pct(computed, runs),
            "named": len(named), "agree": len(agree), "agree_pct": pct(agree, named),
            "explained": len(explained), "agree_or_explained_pct": pct(agree + explained, named),
            "uncertain": sum(1 for r in computed if r.get("uncertain")),
            "no_forward": sum(1 for r in built if str(r.get("why", "")).startswith("no forward"))}


def write_report(rows: list[dict[str, Any]], path: Path) -> None:
    s = summary(rows)
    lines = [
        "# The zoo: every `tiny:<type>`, run, with roles",
        "",
        "Written by `python bench/zoo.py --report` from the sweep's cache (see the script's",
        "docstring). `runs`: the tiny model runs its own forward on inputs synthesized from its",
        "config and forward signature. `roles`: `infer_roles` returns (refusals say why).",
        "`names`: modules whose last name segment plainly names a part (q_proj, query, c_attn,",
        "gate_proj, down_proj, ...) with a certain role, how many of those disagree with it, and",
        "(`+N?`) how many got an uncertain role instead (refused by role selectors). Families:",
        ", ".join(f"`{f}`" for f in FAMILIES) + ".",
        "",
        (f"**{s['types']} types; {s['built']} build ({s['no_forward']} of them without a forward of "
         f"their own); {s['runs']} run ({s['runs_pct']}); roles for "
         f"{s['roles']} of those ({s['roles_pct']}); names agree on {s['agree']} of {s['named']} "
         f"models with conventional names ({s['agree_pct']}); on {s['explained']} more every "
         f"disagreement is a name that misleads, explained in the note ({s['agree_or_explained_pct']} "
         f"with those); {s['uncertain']} marked uncertain.**"),
        "",
        _coverage(len(rows)),
        "",
        "| type | builds | runs | roles | families | names (disagree) | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fams = r.get("families") or {}
        fam = " ".join(f"{f}:{fams[f]}" for f in FAMILIES if f in fams)
        names = f"{r.get('named', 0)} ({r.get('n_disagree', 0)})" if r.get("roles") else ""
        if r.get("named_uncertain"):
            names += f" +{r['named_uncertain']}?"
        note = r.get("why") or r.get("roles_why") or "; ".join(r.get("uncertain") or ()) \
            or ", ".join(r.get("disagree") or ())
        if r.get("explained"):
            note += " (name misleads: " + "; ".join(r["explained"]) + ")"
        lines.append(f"| {r['type']} | {_yes(r.get('built'))} | {_yes(r.get('runs'))} | "
                     f"{_yes(r.get('roles'))} | {fam} | {names} | {_cell(note)} |")
    path.write_text("\n".join(lines) + "\n")
    print(json.dumps(s))


def _coverage(count: int) -> str:
    total = len(all_types())
    if count >= total:
        return f"The whole zoo: every one of the {total} types transformers ships."
    return (f"A sample: {count} of the {total} types transformers ships (`--sample {count}`, a fixed "
            "seed), so the shares above estimate the whole zoo's.")


def _yes(value: Any) -> str:
    return "yes" if value else ("no" if value is not None else "")


def _cell(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("|", "\\|"))[:160]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shard", default="0/1", help="i/n: every n-th type starting at i")
    parser.add_argument("--types", help="comma-separated types instead of the whole zoo")
    parser.add_argument("--only", nargs="+", metavar="TYPE", help="these types instead of the whole zoo")
    parser.add_argument("--sample", type=int, help="a fixed random sample (seed 0) of this many types")
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--budget", type=float, default=3600, help="seconds before stopping")
    parser.add_argument("--per-type", type=int, default=300,
                        help="seconds one type may take (past it, the stage reached counts as failed)")
    parser.add_argument("--fresh", action="store_true", help="redo types already in the cache")
    parser.add_argument("--report", action="store_true", help="write docs/zoo.md from the cache")
    args = parser.parse_args()
    if args.report:
        write_report(read_cache(args.cache), REPORT)
        return
    index, _, count = args.shard.partition("/")
    types = args.only or (args.types.split(",") if args.types else sample(all_types(), args.sample))
    types = types[int(index)::int(count)]
    run_sweep(types, args.cache, args.budget, args.per_type, args.fresh)


if __name__ == "__main__":
    main()
