"""Caption metrics with the COCO caption toolkit (``pycocoevalcap``): BLEU-1..4, METEOR, ROUGE-L, CIDEr.

As the caption papers score (``reference/benchmarks.md`` 2.4, 6): every reference and candidate goes
through pycocoevalcap's ``PTBTokenizer`` (Stanford CoreNLP's PTB tokenizer: lower-cased, punctuation
tokens dropped), then each scorer's ``compute_score`` runs ONCE over the whole split (CIDEr's document
frequencies come from the scored set, so a subset or a batch gives other numbers). ``Bleu(4)`` uses the
``closest`` reference length; ``Rouge`` is ROUGE-L with beta 1.2; ``Cider`` is CIDEr-D (n 1-4, sigma 6).
Values are returned as the toolkit gives them (0-1; CIDEr unscaled); reports multiply by 100.

ROUGE-1 (GeoChat reports it for region captioning) is not in the toolkit: here it is the unigram F1
(clipped counts, best reference per candidate, mean over candidates) on the same tokens, the
``rouge_score`` package's definition that third-party GeoChat scorers use; GeoChat's own tooling is
unconfirmed (``reference/models.md`` 6.1).

Java: the PTB tokenizer and METEOR run Java subprocesses (``java`` on PATH; METEOR takes a 2 GB heap),
and the tokenizer writes a temporary file inside its package folder. :func:`check_caption_scorers` says
what is missing before any inference. Without Java, ``--metrics bleu,rouge-l,cider --tokenizer simple``
scores with a pure-Python tokenizer that mimics PTB's output for plain sentences (numbers then differ
slightly from the papers'; the metrics JSON says which tokenizer ran).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Final

from rsflow.errors import RequestError

logger = logging.getLogger(__name__)

CAPTION_METRICS: Final[tuple[str, ...]] = ("bleu", "meteor", "rouge-l", "cider", "rouge-1")
"""Values of ``--metrics``."""
JAVA_METRICS: Final[frozenset[str]] = frozenset({"meteor"})
"""Metrics whose scorer runs Java."""
TOKENIZERS: Final[tuple[str, ...]] = ("ptb", "simple")
"""``--tokenizer``: pycocoevalcap's PTBTokenizer (Java), or the pure-Python stand-in."""

METRIC_KEYS: Final[dict[str, tuple[str, ...]]] = {
    "bleu": ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"),
    "meteor": ("METEOR",),
    "rouge-l": ("ROUGE_L",),
    "cider": ("CIDEr",),
    "rouge-1": ("ROUGE_1",),
}
"""``--metrics`` value -> the keys it adds to the metrics (COCOEvalCap's names)."""

JAVA_INSTALL_HINT: Final[str] = (
    "install a Java runtime (Debian/Ubuntu: apt-get install default-jre-headless; conda: conda install -c "
    "conda-forge openjdk) or skip what needs it: --metrics bleu,rouge-l,cider --tokenizer simple"
)

# PTBTokenizer's punctuation tokens, dropped from its output (pycocoevalcap tokenizer/ptbtokenizer.py).
_PUNCTUATIONS: Final[frozenset[str]] = frozenset(
    {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";",
     "(", ")", "{", "}", "[", "]", '"'}
)
_TOKEN_RE = re.compile(r"[a-z0-9]+(?:['.][a-z0-9]+)*|'s|n't|\.\.\.|--|[^\sa-z0-9]")
EMPTY_CANDIDATE: Final[str] = "EMPTYCAPTION"
"""The one token that stands for an empty or failed candidate, put in AFTER tokenising (the scorers
misbehave on empty strings; ``reference/benchmarks.md`` 6.1 step 3: "a placeholder token").

Both tokenizers lower-case, so no tokenised reference holds a token with a capital letter: the
placeholder matches none under BLEU, ROUGE and CIDEr, and adds one word to the hypothesis length (a
placeholder run through a tokenizer, such as ``__empty__``, became ``__ empty __``: three or five tokens,
one of them the ordinary caption word "empty"). METEOR lower-cases it again; ``emptycaption`` is no
English word, so its stem, synonym and paraphrase matchers find nothing either."""


def parse_metrics(value: str | Sequence[str] | None, default: Sequence[str]) -> tuple[str, ...]:
    """``--metrics`` as a tuple of :data:`CAPTION_METRICS` values (default when None or empty).

    Raises:
        RequestError: (``--metrics``) an unknown name.
    """
    if value is None or value == "" or value == ():
        return tuple(default)
    names = [v.strip().lower() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    unknown = [n for n in names if n not in CAPTION_METRICS]
    if unknown:
        raise RequestError("--metrics", f"unknown {', '.join(unknown)}; choose from {', '.join(CAPTION_METRICS)}")
    return tuple(dict.fromkeys(names))


def java_available() -> bool:
    """Whether a ``java`` executable is on PATH (what pycocoevalcap starts)."""
    return shutil.which("java") is not None


def check_caption_scorers(metrics: Sequence[str], tokenizer: str) -> None:
    """Refuse, before any inference, a caption scoring that cannot run here.

    Raises:
        RequestError: (``--tokenizer``) unknown tokenizer, or the PTB tokenizer's package folder is not
            writable; (``--metrics``) pycocoevalcap is not installed, or ``java`` is missing for METEOR or
            the PTB tokenizer (the message says how to install a Java runtime or skip them).
    """
    if tokenizer not in TOKENIZERS:
        raise RequestError("--tokenizer", f"{tokenizer!r} is not one of {', '.join(TOKENIZERS)}")
    if importlib.util.find_spec("pycocoevalcap") is None:
        raise RequestError("--metrics", "caption metrics need the pycocoevalcap package: pip install -e '.[eval]' in the rsflow checkout")
    needs = [m for m in metrics if m in JAVA_METRICS] + (["the PTB tokenizer"] if tokenizer == "ptb" else [])
    if needs and not java_available():
        raise RequestError(
            "--metrics", f"{' and '.join(m.upper() if m == 'meteor' else m for m in needs)} run Java "
            f"(pycocoevalcap), and no `java` is on PATH: {JAVA_INSTALL_HINT}"
        )
    if tokenizer == "ptb":
        folder = _ptb_folder()
        if not os.access(folder, os.W_OK):
            raise RequestError(
                "--tokenizer",
                f"pycocoevalcap's PTB tokenizer writes a temporary file into {folder}, which is not writable; "
                "make it writable or use --tokenizer simple",
            )


def _ptb_folder() -> str:
    spec = importlib.util.find_spec("pycocoevalcap.tokenizer.ptbtokenizer")
    if spec is None or spec.origin is None:
        raise RequestError("--metrics", "pycocoevalcap is incomplete (no tokenizer): pip install --force-reinstall pycocoevalcap")
    return os.path.dirname(os.path.abspath(spec.origin))


def simple_tokenize(text: str) -> str:
    """A pure-Python stand-in for ``PTBTokenizer -lowerCase`` on plain sentences, punctuation dropped.

    >>> simple_tokenize("Many aircraft are parked next to a long building, in an airport.")
    'many aircraft are parked next to a long building in an airport'
    """
    tokens = _TOKEN_RE.findall(text.lower().replace("\n", " "))
    return " ".join(t for t in tokens if t not in _PUNCTUATIONS)


def tokenize(captions: Mapping[str, Sequence[str]], tokenizer: str) -> dict[str, list[str]]:
    """``{id: [caption, ...]}`` -> ``{id: [tokenised caption, ...]}`` with the chosen tokenizer."""
    if tokenizer == "ptb":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})  # type: ignore[no-untyped-call]
    return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}


def rouge_1(candidate: str, references: Sequence[str]) -> float:
    """Unigram F1 of tokenised ``candidate`` against the best of ``references`` (clipped counts)."""
    cand = Counter(candidate.split())
    best = 0.0
    for ref in references:
        r = Counter(ref.split())
        overlap = sum((cand & r).values())
        if overlap == 0:
            continue
        p, rec = overlap / sum(cand.values()), overlap / sum(r.values())
        best = max(best, 2 * p * rec / (p + rec))
    return best


def score_captions(
    candidates: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    metrics: Sequence[str] = ("bleu", "meteor", "rouge-l", "cider"),
    tokenizer: str = "ptb",
) -> dict[str, Any]:
    """Corpus scores of one candidate per id against its references, with pycocoevalcap's scorers.

    Args:
        candidates: id -> the model's caption (None or empty counts as an empty caption).
        references: id -> the reference captions; the same ids as ``candidates``.
        metrics: values of :data:`CAPTION_METRICS`.
        tokenizer: ``ptb`` (pycocoevalcap's, Java) or ``simple``.

    Returns:
        The keys of :data:`METRIC_KEYS` for the metrics asked (0-1, CIDEr unscaled), ``n`` and
        ``tokenizer``.

    Raises:
        ValueError: the ids differ, or there is nothing to score.
    """
    if set(candidates) != set(references):
        raise ValueError("candidates and references must have the same ids")
    if not candidates:
        raise ValueError("no caption to score")
    ids = sorted(candidates)
    gts = tokenize({i: list(references[i]) for i in ids}, tokenizer)
    # Only answered candidates are tokenised (an empty line would shift PTBTokenizer's line-to-id mapping);
    # the placeholder goes in after tokenising, for those and for answers that tokenise to nothing ("."),
    # so it stays one token no tokenizer could make.
    answered = {i: [text] for i in ids if (text := str(candidates[i] or "").strip())}
    tokens = tokenize(answered, tokenizer) if answered else {}
    res = {i: [c if c.strip() else EMPTY_CANDIDATE for c in tokens.get(i, [""])] for i in ids}
    out: dict[str, Any] = {"n": len(ids), "tokenizer": tokenizer}
    for metric in metrics:
        if metric == "bleu":
            from pycocoevalcap.bleu.bleu import Bleu

            score, _ = Bleu(4).compute_score(gts, res, verbose=0)  # type: ignore[no-untyped-call]
            out.update({f"Bleu_{i + 1}": float(s) for i, s in enumerate(score)})
        elif metric == "meteor":
            from pycocoevalcap.meteor.meteor import Meteor

            scorer = Meteor()  # type: ignore[no-untyped-call]
            try:
                score, _ = scorer.compute_score(gts, res)  # type: ignore[no-untyped-call]
            finally:
                del scorer  # stops the Java process
            out["METEOR"] = float(score)
        elif metric == "rouge-l":
            from pycocoevalcap.rouge.rouge import Rouge

            score, _ = Rouge().compute_score(gts, res)  # type: ignore[no-untyped-call]
            out["ROUGE_L"] = float(score)
        elif metric == "cider":
            from pycocoevalcap.cider.cider import Cider

            score, _ = Cider().compute_score(gts, res)  # type: ignore[no-untyped-call]
            out["CIDEr"] = float(score)
        elif metric == "rouge-1":
            out["ROUGE_1"] = sum(rouge_1(res[i][0], gts[i]) for i in ids) / len(ids)
        else:
            raise ValueError(f"unknown metric {metric!r}")
    return out
