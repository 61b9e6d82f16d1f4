"""Token ids in, text out one token at a time: incremental decoding and stop sequences.

Decoding each token alone breaks multi-byte characters and the spaces some tokenizers attach
to the next word, so the text of a token is the difference between decoding a short window
that ends with it and the same window without it (the way text-generation servers do it); a
window whose text ends in an incomplete character waits for the next token. Text that could
be the start of a stop sequence is held back until it is clear either way, so a client never
receives part of a stop sequence.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not yet a whole character


class TextStream:
    """Feed token ids with `add`; it returns the text that can be sent now (possibly "").
    `stopped` turns True when a stop sequence appeared: the text before it has been returned and
    nothing after it will be. `finish` returns what is still held back once generation ends."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()):
        self.decode = decode
        self.stop = stop
        self.ids: list[int] = []
        self.prefix = 0  # the window starts here: tokens decoded for context only
        self.read = 0  # tokens before this have had their text returned
        self.held = ""  # text decoded but not sent: it may begin a stop sequence
        self.stopped = False

    def add(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        before = self.decode(self.ids[self.prefix : self.read])
        after = self.decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""  # no whole character yet (or a token with no text, such as an end-of-text)
        self.prefix, self.read = self.read, len(self.ids)
        return self._release(after[len(before) :])

    def finish(self) -> str:
        """What is left once generation ended: an incomplete character as it decodes, and text
        held back for a stop sequence that never came."""
        if self.stopped:
            return ""
        before = self.decode(self.ids[self.prefix : self.read])
        after = self.decode(self.ids[self.prefix :])
        tail = self.held + after[len(before) :]
        self.held = ""
        return tail

    def _release(self, text: str) -> str:
        self.held += text
        if not self.stop:
            out, self.held = self.held, ""
            return out
        found = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
        if found:
            self.stopped = True
            out, self.held = self.held[: min(found)], ""
            return out
        keep = max((_overlap(self.held, s) for s in self.stop), default=0)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return out


def _overlap(text: str, stop: str) -> int:
    """The length of the longest end of `text` that is a beginning of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0
