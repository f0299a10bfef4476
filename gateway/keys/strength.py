"""How strong a key must be to be stored as its hash: the rules `keys import` applies.

A key the gateway mints is random (32 bytes); a key brought from elsewhere may not be,
and the keys file keeps only an unsalted SHA-256 of it. `check_key_strength` refuses
keys too short or too regular to be random, saying why.
"""

from __future__ import annotations

import math
from collections import Counter


class WeakKey(ValueError):
    """A key brought from elsewhere is too weak to store as its hash."""


# What a key brought from elsewhere must be. The file keeps an unsalted SHA-256 of each
# key: whoever reads the file can try billions of guesses a second per GPU, so it is
# safe only for keys that cannot be guessed, which no hash can make up for. 20 characters
# is the floor API-gateway-style keys use (AWS API Gateway's own minimum for imported
# keys), about 119 bits when random and alphanumeric. Length is not enough: the measure
# below is the key's character entropy (Shannon's, over how often each character occurs)
# times its length. It underrates short random keys (a random 20-character alphanumeric
# key measures about 80 bits, and under 63 in none of 300,000 tries), so the floor is 60
# bits, which still refuses keys of few characters ("aaaa...", "abab...") by far. It
# does not see a repeated word ("passwordpassword1234" measures 66 bits), so a key that
# repeats a quarter of itself (at least 4 characters) is refused too; a random
# alphanumeric key does so about once in ten million. Neither rule knows words: a key a
# person made up can pass; a random one of 20 alphanumeric characters or more does.
MIN_KEY_LENGTH = 20
MAX_KEY_LENGTH = 256
MIN_KEY_BITS = 60


def check_key_strength(plaintext: str) -> str:
    """Return `plaintext` if it is a key strong enough to store as its hash, else WeakKey."""
    if not plaintext:
        raise WeakKey("the key is empty")
    if not all("!" <= c <= "~" for c in plaintext):
        # A header carries the key as it is: no spaces, no control or non-ASCII characters.
        raise WeakKey("a key must be printable ASCII with no spaces, tabs or newlines")
    if len(plaintext) < MIN_KEY_LENGTH:
        raise WeakKey(
            f"the key is shorter than {MIN_KEY_LENGTH} characters: the keys file keeps an "
            "unsalted SHA-256, safe only for keys that cannot be guessed"
        )
    if len(plaintext) > MAX_KEY_LENGTH:
        raise WeakKey(f"the key is longer than {MAX_KEY_LENGTH} characters")
    bits = _character_entropy(plaintext)
    if bits < MIN_KEY_BITS:
        raise WeakKey(
            f"the key has too few different characters to be random: {bits:.0f} bits by "
            f"character entropy, under the {MIN_KEY_BITS} a key stored as an unsalted "
            "hash needs"
        )
    if _repeats(plaintext, max(4, len(plaintext) // 4)):
        raise WeakKey(
            "the key repeats a quarter of itself (or 4 characters), as a random key does not"
        )
    return plaintext


def _character_entropy(text: str) -> float:
    """Shannon entropy of the characters of `text`, in bits per character, times its length."""
    n = len(text)
    return n * math.log2(n) - sum(c * math.log2(c) for c in Counter(text).values())


def _repeats(text: str, size: int) -> bool:
    """True if some `size` consecutive characters of `text` occur in it twice."""
    seen: set[str] = set()
    for start in range(len(text) - size + 1):
        chunk = text[start : start + size]
        if chunk in seen:
            return True
        seen.add(chunk)
    return False
