"""Caption metrics as COCO, LAVIS and the BLIP papers compute them: `pycocoevalcap`.

`score_captions` does what `pycocoevalcap.eval.COCOEvalCap.evaluate` does, without the pycocotools
objects: the references and the predictions go through the Stanford PTB tokenizer (Java; lower-cases
and drops punctuation tokens), then BLEU-1..4 (`Bleu(4)`, "closest" reference length), METEOR 1.5
(Java), ROUGE-L and CIDEr (`Cider` is CIDEr-D: clipped n-gram counts and a length penalty, sigma 6,
document frequencies from the evaluated references) score them. SPICE runs when its Stanford CoreNLP
models are installed; pycocoevalcap downloads them on first use, which cannot work without network,
so we check for the two jars first and otherwise leave SPICE out with one line saying why (instead of
hanging in a download). Scores are returned x100, as papers report them.

Without Java (`java=False`): BLEU, ROUGE-L and CIDEr with `simple_tokenize`, a Python approximation
of the PTB tokenizer; the result is marked not comparable to published numbers (the tokenizer differs
on rare punctuation, and METEOR is missing).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from blip_toolkit.errors import BlipError, UsageError

logger = logging.getLogger("blip")

# COCOEvalCap's metric names (what LAVIS logs and papers quote): Bleu_4 x100 is "B@4", CIDEr is CIDEr-D.
BLEU = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")
METRICS = (*BLEU, "METEOR", "ROUGE_L", "CIDEr", "SPICE")
NOT_COMPARABLE = (
    "not comparable to published numbers: --no-java tokenizes with a Python approximation of the PTB "
    "tokenizer and has no METEOR or SPICE"
)
# pycocoevalcap/tokenizer/ptbtokenizer.py: tokens dropped after tokenization.
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


class JavaMissingError(BlipError):
    """pycocoevalcap's PTB tokenizer and METEOR need a Java runtime."""


@dataclass
class CaptionScores:
    """Corpus scores x100 (`metrics`, in METRICS order, SPICE only when it ran) and per-image scores
    (x100, same keys, in the order of the ids given)."""

    metrics: dict[str, float]
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)
    tokenizer: str = "ptb"
    comparable: bool = True
    notes: list[str] = field(default_factory=list)


def java_available() -> bool:
    """A `java` that runs (`java -version` exits 0 within 20 s)."""
    java = shutil.which("java")
    if java is None:
        return False
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def require_java() -> None:
    """Raise JavaMissingError (one line naming Java and the way out) unless Java runs."""
    if not java_available():
        raise JavaMissingError(
            "Java is not installed or does not run: pycocoevalcap's PTB tokenizer and METEOR need it",
            hint="install a Java runtime (Debian: apt-get install default-jre-headless), or pass --no-java "
            "for BLEU / ROUGE-L / CIDEr with a Python tokenizer (not comparable to published numbers)",
        )


def spice_missing_reason() -> str | None:
    """Why SPICE cannot run here, or None when it can (its CoreNLP jars are installed)."""
    try:
        import pycocoevalcap.spice.spice as spice_module
    except ImportError as exc:  # pragma: no cover - pycocoevalcap is required before this is asked
        return f"pycocoevalcap's SPICE does not import ({exc})"
    lib = Path(spice_module.__file__).parent / "lib"
    missing = [name for name in SPICE_JARS if not (lib / name).is_file()]
    if missing:
        return (
            f"SPICE left out: its Stanford CoreNLP models ({', '.join(missing)} in {lib}) are not installed "
            "and pycocoevalcap would download them on first use, which needs network"
        )
    return None


def pycocoevalcap_version() -> str | None:
    try:
        return metadata.version("pycocoevalcap")
    except metadata.PackageNotFoundError:
        return None


def score_captions(
    references: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    *,
    java: bool = True,
    spice: bool | None = None,
) -> CaptionScores:
    """Score one predicted caption per image against that image's references.

    references: {image id: [reference captions]}, predictions: {image id: caption}; the ids of
    `predictions` are scored (each must have references). java: the pycocoevalcap pipeline (PTB
    tokenizer, METEOR); False: BLEU / ROUGE-L / CIDEr with `simple_tokenize`. spice: None = when
    available, True = required, False = never.
    """
    _import_pycocoevalcap()
    ids = list(predictions)
    if not ids:
        raise UsageError("no predictions to score")
    for image_id in ids:
        if not references.get(image_id):
            raise UsageError(f"image {image_id!r} has a prediction but no reference caption")
    # COCOEvalCap passes the annotation dicts; the tokenizer reads only their "caption".
    gts_raw = {i: [{"caption": c} for c in references[i]] for i in ids}
    res_raw = {i: [{"caption": predictions[i]}] for i in ids}
    notes: list[str] = []
    if java:
        require_java()
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize(gts_raw)
        res = tokenizer.tokenize(res_raw)
    else:
        gts = {i: [simple_tokenize(c["caption"]) for c in v] for i, v in gts_raw.items()}
        res = {i: [simple_tokenize(c["caption"]) for c in v] for i, v in res_raw.items()}
        notes.append(NOT_COMPARABLE)

    scorers = _scorers(java, spice, notes)
    metrics: dict[str, float] = {}
    per_image: dict[str, dict[str, float]] = {i: {} for i in ids}
    for scorer, names in scorers:
        logger.debug("computing %s", scorer.method())
        if names == BLEU:
            score, scores = scorer.compute_score(gts, res, verbose=0)
        else:
            score, scores = scorer.compute_score(gts, res)
        if isinstance(names, tuple):
            for name, value, values in zip(names, score, scores):
                metrics[name] = 100.0 * float(value)
                for image_id, v in zip(gts.keys(), values):
                    per_image[image_id][name] = 100.0 * float(v)
        else:
            metrics[names] = 100.0 * float(score)
            for image_id, v in zip(gts.keys(), scores):
                # SPICE gives a dict of sub-scores per image; its F-score "All" is the number.
                per_image[image_id][names] = 100.0 * float(v["All"]["f"] if isinstance(v, dict) else v)
    ordered = {name: metrics[name] for name in METRICS if name in metrics}
    return CaptionScores(
        metrics=ordered,
        per_image=per_image,
        tokenizer="ptb" if java else "python",
        comparable=java,
        notes=notes,
    )


def _scorers(java: bool, spice: bool | None, notes: list[str]):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scorers: list = [(Bleu(4), BLEU)]
    if java:
        from pycocoevalcap.meteor.meteor import Meteor

        scorers.append((Meteor(), "METEOR"))
    scorers += [(Rouge(), "ROUGE_L"), (Cider(), "CIDEr")]
    if java and spice is not False:
        reason = spice_missing_reason()
        if reason is None:
            from pycocoevalcap.spice.spice import Spice

            scorers.append((Spice(), "SPICE"))
        elif spice:
            raise UsageError(reason)
        else:
            notes.append(reason)
            logger.warning(reason)
    return scorers


def _import_pycocoevalcap() -> None:
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError as exc:
        raise UsageError(
            "caption metrics need pycocoevalcap, which is not installed",
            hint="pip install 'blip-toolkit[eval]' (or pip install pycocoevalcap)",
        ) from exc


# --- the Python tokenizer of --no-java ---------------------------------------------------------------

# PTB's bracket tokens, lower-cased as `-lowerCase` leaves them (so, like the real pipeline, they are
# NOT in the punctuation list and stay in the text).
# A double quote becomes `` or '' there, which the punctuation list then drops.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-", '"': "''"}
_TOKEN = re.compile(
    r"""
    (?:[a-z]\.){2,}                    # abbreviations: u.s. a.m.
    | n't | '(?:s|re|ve|ll|d|m)\b      # contractions, split off by _CONTRACTION first
    | \d+(?:[.,:/]\d+)+                # numbers with separators: 3.5 10:30 1,000 1/2
    | [\w&]+(?:[-/][\w&]+)*            # words, with inner hyphens or slashes: black-and-white fork/knife
    | \.\.\. | -- | `` | ''           # multi-character punctuation
    | \S                               # any other character on its own
    """,
    re.VERBOSE,
)
_CONTRACTION = re.compile(r"(\w)(n't|'(?:s|re|ve|ll|d|m))\b")


def simple_tokenize(caption: str) -> str:
    """Lower-case, PTB-like tokens, PTB punctuation tokens dropped, joined by single spaces.

    Agrees with pycocoevalcap's PTBTokenizer on ordinary captions (tests/eval compares them); rare
    constructions (URLs, emoticons, quotes inside words) can differ."""
    text = caption.replace("\n", " ").lower()
    for _ in range(2):  # "shouldn't've": the second pass splits the 've after the n't
        text = _CONTRACTION.sub(r"\1 \2", text)
    tokens = [_BRACKETS.get(t, t) for t in _TOKEN.findall(text)]
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION)
