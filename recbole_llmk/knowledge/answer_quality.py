"""The answer gate: tell usable LLM knowledge from a refusal or a degenerate answer.

Why a gate: a large model sometimes refuses ("I'm sorry, I can't help with that"), a small one
loops, answers nothing or repeats the prompt back. Each of those would otherwise be cached,
encoded and trained on as if it were knowledge. :func:`assess` names what is wrong with one
answer (or None); the backends count the verdicts in their report, log examples and act on
``llm_on_bad_answer`` (``keep``, ``retry`` or ``fail``; see generation.py).

The checks are deliberately conservative (a flagged answer is clearly not knowledge):
  empty     nothing but whitespace or punctuation
  refusal   opens with an apology or an "I can't" formula, or with "as an AI" and a first sentence
            that declines
  loop      the same word 4-grams over and over (most of the answer, or most of its second half),
            or text that compresses to almost nothing (character-level repetition)
  echo      most of the answer is the prompt, copied
"""

import re
import zlib

VERDICTS = ("empty", "refusal", "loop", "echo")

_REFUSING = (r"i'm sorry|i am sorry|sorry, (?:but )?i|i apologi[sz]e|i cannot|i can't|i can not|"
             r"i'm (?:not able|unable)|i am (?:not able|unable)|i won't|i will not|"
             r"i (?:do not|don't) have (?:access|the ability|enough information|personal)")
_REFUSAL = re.compile(r"^\W*(?:" + _REFUSING + ")", re.IGNORECASE)
# "As an AI ..." refuses only when its first sentence declines: SmolLM2 opens real (if weak)
# analyses with "As an AI designed to ..., I will analyze the user's preferences".
_AI_IDENTITY = re.compile(r"^\W*(?:as an ai\b|as a language model|i'm just an ai|i am just an ai)", re.IGNORECASE)
_REFUSING_IN_SENTENCE = re.compile(r"^[^.!?\n]*?\b(?:" + _REFUSING + ")", re.IGNORECASE)
# Word 4-grams: a loop repeats them, natural text almost never does.
_GRAM = 4
_MIN_WORDS = 30  # shorter answers carry too few 4-grams to judge
_MAX_DISTINCT_SHARE = 0.5  # whole answer: under half of its 4-grams distinct is a loop
_MAX_DISTINCT_SHARE_TAIL = 0.35  # second half: a loop that started mid-answer
_MIN_COMPRESSED_SHARE = 0.12  # zlib; English prose keeps ~0.4-0.6 of its bytes
_MIN_CHARS_TO_COMPRESS = 400
_ECHO_GRAM = 6
_MIN_ECHO_GRAMS = 20  # a short answer that quotes the prompt (a title, a name) is no echo
_MIN_ECHO_SHARE = 0.6  # share of the answer's word 6-grams found in the prompt


def _words(text):
    return re.findall(r"\w+|[^\w\s]", text.lower())


def _grams(words, n):
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def _distinct_share(grams):
    return len(set(grams)) / len(grams) if grams else 1.0


def is_ai_refusal(text):
    return bool(_AI_IDENTITY.match(text)) and bool(_REFUSING_IN_SENTENCE.match(text))


def is_loop(text):
    words = _words(text)
    if len(words) >= _MIN_WORDS:
        if _distinct_share(_grams(words, _GRAM)) < _MAX_DISTINCT_SHARE:
            return True
        if _distinct_share(_grams(words[len(words) // 2:], _GRAM)) < _MAX_DISTINCT_SHARE_TAIL:
            return True
    data = text.encode("utf-8")
    return len(data) >= _MIN_CHARS_TO_COMPRESS and len(zlib.compress(data)) / len(data) < _MIN_COMPRESSED_SHARE


def is_echo(text, prompt):
    grams = _grams(_words(text), _ECHO_GRAM)
    if len(grams) < _MIN_ECHO_GRAMS or not prompt:
        return False
    in_prompt = set(_grams(_words(prompt), _ECHO_GRAM))
    return sum(gram in in_prompt for gram in grams) / len(grams) >= _MIN_ECHO_SHARE


def assess(answer, prompt=""):
    """Why ``answer`` (to ``prompt``) is not usable knowledge: one of :data:`VERDICTS`, or None."""
    text = (answer or "").replace("\u2019", "'").strip()
    if not re.search(r"\w", text):
        return "empty"
    if _REFUSAL.match(text[:200]) or is_ai_refusal(text[:300]):
        return "refusal"
    if is_loop(text):
        return "loop"
    if is_echo(text, prompt):
        return "echo"
    return None
