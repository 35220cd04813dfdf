"""Token ids back to readable text: pieces whose concatenation is the tokenizer's own decoding (WordPiece
``##`` joins, BPE leading spaces), and whitespace made visible for display."""
from __future__ import annotations

_VISIBLE = {"\n": "↵", "\r": "", "\t": "⇥"}


def token_pieces(tokenizer, ids: list[int], left: list[int] | None = None) -> list[str]:
    """One string per token such that ``"".join(pieces)`` reads like ``tokenizer.decode(ids)``: each piece is
    what decoding one more token adds (so ``##ded`` joins its word and ``Ġline`` keeps its space). ``left``:
    tokens just before ``ids``, decoded first and dropped, so a context cut mid-word starts as ``ded``."""
    left = list(left or [])
    # One batch call for every prefix: much less per-call overhead than decoding them one by one.
    prefixes = tokenizer.batch_decode([left + ids[: i + 1] for i in range(len(ids))] + ([left] if left else []))
    prev = prefixes.pop() if left else ""
    pieces = []
    for i, full in enumerate(prefixes):
        if full.startswith(prev):
            pieces.append(full[len(prev):])
        else:  # decoding changed earlier text (a byte-level BPE character completed): fall back to the token
            pieces.append(tokenizer.decode(ids[i:i + 1]))
        prev = full
    return pieces


def visible(piece: str) -> str:
    """``piece`` with newlines and tabs drawn as ↵ and ⇥, and a piece of spaces only as middle dots, so a
    whitespace token shows up and never breaks a line."""
    if piece and not piece.strip(" "):
        return "·" * len(piece)
    return "".join(_VISIBLE.get(c, c) for c in piece)
