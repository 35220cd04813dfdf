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
    done = prefixes.pop() if left else ""
    pieces = []
    for i, full in enumerate(prefixes):
        if full.endswith("\ufffd") and i + 1 < len(ids):
            # A byte-level BPE token holding part of a character (Chinese, emoji): the token that completes
            # the character gets all of it, this one nothing, so no "�" shows and the join still decodes.
            pieces.append("")
            continue
        if full.startswith(done):
            pieces.append(full[len(done):])
        else:  # decoding changed earlier text: fall back to the token alone
            pieces.append(tokenizer.decode(ids[i:i + 1]))
        done = full
    return pieces


def visible(piece: str) -> str:
    """``piece`` with newlines and tabs drawn as ↵ and ⇥, and a piece of spaces only as middle dots, so a
    whitespace token shows up and never breaks a line."""
    if piece and not piece.strip(" "):
        return "·" * len(piece)
    return "".join(_VISIBLE.get(c, c) for c in piece)
