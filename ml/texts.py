"""Which texts are tagged: the rules the service applies to a request's texts and ``ner bulk`` to a
corpus's documents. Standard library only."""
from __future__ import annotations

import re

# C0/C1 controls except tab, newline and carriage return; UTF-16 surrogates
_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def text_problem(text: str, max_chars: int) -> tuple[str, str] | None:
    """Why a text is not tagged (the service's and ``ner bulk``'s rules), or None: ``(code, reason)``
    where the reason reads after the text's name (``"texts[3] " + reason``). Empty or whitespace-only
    texts, texts over ``max_chars``, control characters (NUL cannot even be stored in Postgres) and
    lone surrogates (not encodable as UTF-8)."""
    if len(text) > max_chars:
        return "text_too_long", f"has {len(text)} characters; the limit is {max_chars}"
    if not text.strip():
        return "empty_text", "is empty or only whitespace"
    bad = _FORBIDDEN.search(text)
    if bad is not None:
        ch = bad.group()
        kind = "a lone surrogate" if 0xD800 <= ord(ch) < 0xE000 else "the control character"
        return "invalid_character", f"contains {kind} U+{ord(ch):04X} at offset {bad.start()}"
    return None
