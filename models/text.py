"""Text normalisation for WER: one function shared by every ASR backend and every reference.

WER is only comparable across rounds and backends if references and hypotheses go through the
same normaliser, so nothing else in the package should lowercase or strip punctuation on its own.
"""

from __future__ import annotations

import re
import unicodedata

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
         "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_ORDINAL_IRREGULAR = {"one": "first", "two": "second", "three": "third", "five": "fifth",
                      "eight": "eighth", "nine": "ninth", "twelve": "twelfth"}
MAX_SPELLED_INT = 999_999


def int_to_words(n: int) -> str:
    """English words for 0 <= n <= 999999, without "and": 105 -> "one hundred five"."""
    if not 0 <= n <= MAX_SPELLED_INT:
        raise ValueError(f"int_to_words covers 0..{MAX_SPELLED_INT}, got {n}; spell longer "
                         f"numbers digit by digit")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f" {_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {int_to_words(rest)}" if rest else "")
    thousands, rest = divmod(n, 1000)
    return f"{int_to_words(thousands)} thousand" + (f" {int_to_words(rest)}" if rest else "")


def _digits_to_words(digits: str) -> str:
    # Leading zeros ("007") and numbers past the spelled range (phone numbers, ids) are read
    # digit by digit, which is also how a TTS front end usually says them.
    if (len(digits) > 1 and digits[0] == "0") or int(digits) > MAX_SPELLED_INT:
        return " ".join(_ONES[int(d)] for d in digits)
    return int_to_words(int(digits))


def _ordinal(words: str) -> str:
    head, _, last = words.rpartition(" ")
    if last in _ORDINAL_IRREGULAR:
        last = _ORDINAL_IRREGULAR[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last = last + "th"
    return f"{head} {last}" if head else last


def normalize_text(text: str) -> str:
    """Canonical form of a transcript for WER.

    Lowercase, unicode NFKC, '-' and '_' to spaces, numbers spelled out ("42" -> "forty two",
    "3.5" -> "three point five", "21st" -> "twenty first", "1,000" -> "one thousand"; numbers
    above 999999 or with leading zeros digit by digit), "%" -> "percent", "&" -> "and",
    all other punctuation replaced by spaces except apostrophes inside a word ("don't" stays,
    "'quoted'" and "dogs'" lose theirs), whitespace collapsed. Years are not special-cased:
    "1813" is "one thousand eight hundred thirteen", not "eighteen thirteen".

    Args:
        text: any transcript, reference or hypothesis.

    Returns:
        space-separated lowercase words; '' when nothing speakable is left.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    # NFKC leaves typographic apostrophes alone; references pasted from documents carry them.
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u02bc", "'")
    text = re.sub(r"(?<=[0-9]),(?=[0-9]{3}(?![0-9]))", "", text)  # thousands separators
    text = re.sub(r"([0-9]+)\.([0-9]+)",
                  lambda m: f" {_digits_to_words(m[1])} point "
                            + " ".join(_ONES[int(d)] for d in m[2]) + " ", text)
    text = re.sub(r"([0-9]+)(st|nd|rd|th)\b", lambda m: f" {_ordinal(_digits_to_words(m[1]))} ",
                  text)
    text = re.sub(r"[0-9]+", lambda m: f" {_digits_to_words(m[0])} ", text)
    text = text.replace("%", " percent ").replace("&", " and ")
    text = re.sub(r"[^\w\s']|_", " ", text)
    text = re.sub(r"(?<!\w)'|'(?!\w)", " ", text)
    return " ".join(text.split())
