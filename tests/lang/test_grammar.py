"""The grammar builds without LALR conflicts, is loaded lazily, and the language imports no torch."""

from __future__ import annotations

import logging
import subprocess
import sys
from importlib import resources

from lark import Lark, logger


def test_grammar_has_no_conflicts(caplog):
    text = resources.files("surgeon.grammar").joinpath("peft.lark").read_text(encoding="utf-8")
    assert not _conflicts(text, caplog)
    assert _conflicts('start: e\ne: e "+" e | "n"', caplog)  # an ambiguous grammar does conflict


def _conflicts(grammar: str, caplog) -> list[str]:
    """Shift/reduce conflicts Lark resolved silently while building `grammar` (it logs them)."""
    caplog.clear()
    level = logger.level
    try:
        with caplog.at_level(logging.DEBUG, logger="lark"):
            Lark(grammar, parser="lalr", propagate_positions=True)
    finally:
        logger.setLevel(level)
    return [r.getMessage() for r in caplog.records if "conflict" in r.getMessage().lower()]


def test_language_is_torch_free_and_grammar_is_lazy():
    code = (
        "import sys\n"
        "import surgeon.lang as lang\n"
        "from surgeon.lang.parser import grammar_parser\n"
        "assert grammar_parser.cache_info().currsize == 0, 'grammar built at import time'\n"
        "lang.parse('adapter a = lora() { target @attn.q }')\n"
        "assert grammar_parser.cache_info().currsize == 1\n"
        "assert 'torch' not in sys.modules and 'peft' not in sys.modules, 'heavy import'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
