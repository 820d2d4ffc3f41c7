"""What `blip ui` serves, without the web layer: models loaded once on first use, and captioning,
VQA and retrieval requests from concurrent callers batched into the library calls the CLI makes
(`caption_images`, `answer_questions`, `rank_texts`), so a request gets what `blip caption` /
`blip vqa` / `blip retrieval` give for the same image and options.

Requests with the same options go to the library together: one `caption_images` call for N
captions with the same decoding options runs one batched `generate` (the library groups prompts of
equal token length, which is what makes a batched result equal the one-at-a-time result). Each
request gets its own result or its own error (`InputError` with a one-line message).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blip_toolkit.data.batching import check_text
from blip_toolkit.data.images import DEFAULT_MAX_PIXELS, InputItem
from blip_toolkit.errors import BlipError, InputError, UsageError
from blip_toolkit.jobs.predict import answer_questions, caption_images, rank_texts
from blip_toolkit.models.loading import inspect_source, open_spec, require_task
from blip_toolkit.models.spec import DEFAULT_MODELS, LoadSpec
from blip_toolkit.predictors.generation import forbidden_tokens
from blip_toolkit.predictors.options import CaptionOptions, GenerationOptions, RetrievalOptions, VqaOptions
from blip_toolkit.ui.batcher import Batcher

logger = logging.getLogger("blip")

TASKS = ("caption", "vqa", "retrieval")


@dataclass
class ServiceConfig:
    """Models and limits of one `blip ui` server. A task without its own model uses `model` when
    that checkpoint can do the task (a BLIP-2 checkpoint serves all three), else the task's default."""

    load: LoadSpec = field(default_factory=LoadSpec)  # load.model: the caption model (and the fallback)
    vqa_model: str | None = None
    retrieval_model: str | None = None
    max_batch_size: int = 8
    max_pixels: int = DEFAULT_MAX_PIXELS
    batch_wait: float = 0.005  # seconds the batcher waits for more requests after the first

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise UsageError("--max-batch-size must be at least 1")


@dataclass(frozen=True)
class ModelCall:
    """One library call made for a batch of requests: how many requests, how many of them failed
    (a bad upload, say: the others still get their results), how many model passes it took."""

    task: str
    requests: int
    model_runs: int
    failed: int = 0


class _CountingRunner:
    """The runner as the library sees it (`loaded`, `run`), counting the model passes it makes."""

    def __init__(self, runner) -> None:
        self._runner = runner
        self.runs = 0

    @property
    def loaded(self):
        return self._runner.loaded

    def run(self, call):
        self.runs += 1
        return self._runner.run(call)


class ModelHolder:
    """One checkpoint, loaded on first use (once, even when several requests ask at the same time)
    through `open_runner`, the CLI's loading path: family detection and the CUDA-fault fallback.
    `lock` serialises model calls when several tasks share the checkpoint."""

    def __init__(self, source: str, load: LoadSpec) -> None:
        self.source = source
        self._load = load
        self._runner = None
        self._load_lock = threading.Lock()
        self.lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._runner is not None

    def runner(self):
        if self._runner is None:
            with self._load_lock:
                if self._runner is None:
                    logger.info("loading %s", self.source)
                    self._runner = open_spec(dataclasses.replace(self._load, model=self.source), None)
                    logger.info("loaded %s (%s)", self.source, self._runner.loaded.family.label)
        return self._runner


class Models:
    """Which checkpoint serves which task, and one holder per checkpoint."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self._explicit = {
            "caption": config.load.model,
            "vqa": config.vqa_model,
            "retrieval": config.retrieval_model,
        }
        self._sources: dict[str, str] = {}
        self._holders: dict[str, ModelHolder] = {}
        self._lock = threading.Lock()

    def source(self, task: str) -> str:
        """The checkpoint for `task` (reads the --model checkpoint's config.json the first time)."""
        with self._lock:
            if task not in self._sources:
                self._sources[task] = self._choose(task)
            return self._sources[task]

    def describe(self, task: str) -> str:
        """For the page: the checkpoint a task uses, without touching the disk or the network."""
        if task in self._sources:
            return self._sources[task]
        if self._explicit[task]:
            return self._explicit[task]
        if task != "caption" and self.config.load.model:
            return f"{self.config.load.model} if it can do {task}, else {DEFAULT_MODELS[task]}"
        return DEFAULT_MODELS[task]

    def _choose(self, task: str) -> str:
        if self._explicit[task]:
            return self._explicit[task]
        if task != "caption" and self.config.load.model:
            _, family = inspect_source(self.config.load.model)
            if task in family.tasks:
                return self.config.load.model
        return DEFAULT_MODELS[task]

    def holder(self, task: str) -> ModelHolder:
        source = self.source(task)
        with self._lock:
            if source not in self._holders:
                self._holders[source] = ModelHolder(source, self.config.load)
            holder = self._holders[source]
        runner = holder.runner()
        require_task(runner.loaded.family, task, source)
        return holder


@dataclass(frozen=True)
class _Request:
    image: str
    key: Hashable  # requests with equal keys share one library call
    options: Any
    text: str | None = None
    texts: tuple[str, ...] = ()


@dataclass
class InferenceService:
    """Captioning, VQA and retrieval for concurrent callers. `caption`, `answer` and `rank` block
    until their batch has run and return the result or raise an `InputError` for that request."""

    config: ServiceConfig
    models: Models = field(init=False)
    calls: list[ModelCall] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.models = Models(self.config)
        size, wait = self.config.max_batch_size, self.config.batch_wait
        self._batchers = {
            "caption": Batcher(self._run_captions, max_batch_size=size, wait=wait, name="blip-ui-caption"),
            "vqa": Batcher(self._run_vqa, max_batch_size=size, wait=wait, name="blip-ui-vqa"),
            "retrieval": Batcher(
                self._run_retrieval, max_batch_size=size, wait=wait, name="blip-ui-retrieval"
            ),
        }

    # ------------------------------------------------------------------ requests

    def caption(
        self,
        image: str | None,
        *,
        prompt: str | None = None,
        num_beams: int = 1,
        max_new_tokens: int = 30,
        sample: bool = False,
        top_p: float = 0.9,
        temperature: float = 1.0,
    ) -> str:
        """The caption of one image, as `blip caption IMAGE` with the same options gives it."""
        image = _image(image)
        prompt = prompt or None
        generation = _generation(num_beams, max_new_tokens, sample, top_p, temperature)
        if prompt is not None:
            self._check_text("caption", prompt, "the prompt")
        options = CaptionOptions(
            prompt=prompt,
            batch_size=self.config.max_batch_size,
            max_pixels=self.config.max_pixels,
            generation=generation,
        )
        return self._batchers["caption"].submit(_Request(image, _key(options), options))

    def answer(
        self,
        image: str | None,
        question: str | None,
        *,
        num_beams: int = 1,
        max_new_tokens: int = 10,
    ) -> str:
        """The answer to one question about one image, as `blip vqa IMAGE QUESTION` gives it."""
        image = _image(image)
        question = question or ""
        if not question.strip():
            raise InputError("the question is empty")
        self._check_text("vqa", question, "the question")
        options = VqaOptions(
            batch_size=self.config.max_batch_size,
            max_pixels=self.config.max_pixels,
            generation=_generation(num_beams, max_new_tokens, False, 0.9, 1.0),
        )
        return self._batchers["vqa"].submit(_Request(image, _key(options), options, text=question))

    def rank(
        self, image: str | None, texts: list[str] | str | None, *, score: str | None = None
    ) -> list[dict]:
        """Candidate texts ranked for one image (best first, with probabilities), as
        `blip retrieval IMAGE TEXT...` gives them. `texts` may be one string, one text per line."""
        image = _image(image)
        if isinstance(texts, str):
            texts = texts.splitlines()
        texts = tuple(t.strip() for t in (texts or []) if t.strip())
        if not texts:
            raise InputError("no candidate texts given (one per line)")
        score = score or None
        options = RetrievalOptions(
            score=score, batch_size=self.config.max_batch_size, max_pixels=self.config.max_pixels
        )
        for number, text in enumerate(texts, start=1):
            self._check_text("retrieval", text, f"candidate text {number}")
        return self._batchers["retrieval"].submit(
            _Request(image, (texts, _key(options)), options, texts=texts)
        )

    def max_batch(self, task: str) -> int:
        """The most requests one library call of `task` has served so far."""
        return max((c.requests for c in self.calls if c.task == task), default=0)

    def close(self) -> None:
        for batcher in self._batchers.values():
            batcher.close()

    # ------------------------------------------------------------------ batches

    def _check_text(self, task: str, text: str, what: str) -> None:
        """Refuse text with a token the model reserves (BLIP-2's <image>) before it joins a batch."""
        loaded = self.models.holder(task).runner().loaded
        check_text(text, forbidden_tokens(loaded), what=what)

    def _run_captions(self, requests: list[_Request]) -> list[str | Exception]:
        return self._run_grouped(
            "caption",
            requests,
            lambda runner, group: caption_images(
                runner, [InputItem(r.image) for r in group], group[0].options
            ),
            "caption",
        )

    def _run_vqa(self, requests: list[_Request]) -> list[str | Exception]:
        return self._run_grouped(
            "vqa",
            requests,
            lambda runner, group: answer_questions(
                runner, [InputItem(r.image) for r in group], [r.text for r in group], group[0].options
            ),
            "answer",
        )

    def _run_retrieval(self, requests: list[_Request]) -> list[list[dict] | Exception]:
        return self._run_grouped(
            "retrieval",
            requests,
            lambda runner, group: rank_texts(
                runner, [InputItem(r.image) for r in group], list(group[0].texts), group[0].options
            ),
            "results",
        )

    def _run_grouped(
        self,
        task: str,
        requests: list[_Request],
        call: Callable[[Any, list[_Request]], Any],
        result_key: str,
    ) -> list[Any]:
        """One library call per group of requests with equal options; one result (or error) each."""
        holder = self.models.holder(task)
        groups: dict[Hashable, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[request.key].append(index)
        out: list[Any] = [None] * len(requests)
        for indices in groups.values():
            group = [requests[i] for i in indices]
            runner = _CountingRunner(holder.runner())
            try:
                with holder.lock:
                    records = list(call(runner, group))
            except BlipError as exc:  # the group's shared input is bad (e.g. an empty candidate text)
                for i in indices:
                    out[i] = InputError(_tidy(str(exc), group))
                continue
            failed = 0
            for i, request, record in zip(indices, group, records):
                if "error" in record:
                    out[i] = InputError(_tidy(record["error"], [request]))
                    failed += 1
                else:
                    out[i] = record[result_key]
            self.calls.append(ModelCall(task, len(group), runner.runs, failed))
            logger.debug("%s: %d request(s) in %d model pass(es)", task, len(group), runner.runs)
        return out


def _image(image: str | None) -> str:
    if not image:
        raise InputError("no image given: upload an image first")
    return str(image)


def _generation(num_beams, max_new_tokens, sample, top_p, temperature) -> GenerationOptions:
    """Decoding options from form or API values (sliders send floats)."""
    try:
        return GenerationOptions(
            max_new_tokens=_whole(max_new_tokens, "max new tokens"),
            num_beams=_whole(num_beams, "beams"),
            sample=bool(sample),
            top_p=float(top_p),
            temperature=float(temperature),
        )
    except (TypeError, ValueError) as exc:
        raise UsageError(f"bad decoding option ({exc})") from exc


def _whole(value, name: str) -> int:
    number = float(value)
    if not number.is_integer():
        raise UsageError(f"{name} must be a whole number, not {value}")
    return int(number)


def _key(options) -> Hashable:
    return dataclasses.astuple(options)


def _tidy(message: str, requests: list[_Request]) -> str:
    """Name uploads by their file name, not the server's temporary path."""
    for request in requests:
        message = message.replace(request.image, Path(request.image).name)
    return message
