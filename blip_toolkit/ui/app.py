"""The `blip ui` page and API, built with Gradio on top of `InferenceService`.

Three tabs (Caption, VQA, Retrieval), each one event with an API name (`/caption`, `/vqa`,
`/retrieval`), callable from the page, from `gradio_client` and over HTTP. Each event goes through
Gradio's queue (bounded: at most `2 x max_batch_size` requests of a task run at once, the rest
wait in the queue) into the service's batcher, which runs concurrent requests as one library call.

Bad input (an unreadable or over-large image, an empty question, a reserved token) becomes a
`gr.Error` with the library's one-line message: shown in the page, raised by `gradio_client` as an
`AppError`, never a stack trace; the server goes on serving.
"""

from __future__ import annotations

import contextlib
import html
import logging
import sys
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from blip_toolkit.errors import BlipError, UsageError
from blip_toolkit.predictors.options import ITM_SCORES
from blip_toolkit.ui.service import InferenceService, ServiceConfig

logger = logging.getLogger("blip")

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_FILE_SIZE = "50mb"  # uploads above this are refused by Gradio before they reach us
SCORES = ("auto",) + ITM_SCORES + ("likelihood",)
RESULT_COLUMNS = ["rank", "text", "score", "probability"]


def upload_path(payload) -> str | None:
    """The path of an uploaded image, from the event's unprocessed input.

    The events run with `preprocess=False`: `gr.Image` would otherwise open every upload with PIL
    before our handler runs, so an unreadable file would fail inside Gradio with a generic error.
    Unprocessed, the upload is still checked and moved into Gradio's cache; the handler gets its
    path, and the library's `open_image` is the only reader: the CLI's decompression-bomb guard,
    its one-line messages and its pixels."""
    if payload is None:
        return None
    path = payload.get("path") if isinstance(payload, dict) else None
    if not path:  # an inline data: URL instead of an uploaded file
        raise UsageError("send the image as a file upload")
    return str(path)


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    """`user:password` -> (user, password)."""
    if auth is None:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise UsageError("--auth must be user:password (both non-empty)")
    return user, password


def _respond(request: gr.Request | None, work):
    """Run one request; turn a refusal into a gr.Error with its one-line message (no traceback)."""
    try:
        return work()
    except BlipError as exc:
        logger.warning("refused: %s", exc)
        raise gr.Error(_shown(str(exc), request), print_exception=False) from None
    except Exception as exc:  # noqa: BLE001 - the server keeps serving; the log has the details
        logger.exception("request failed")
        message = f"internal error ({type(exc).__name__}); the server log has the details"
        raise gr.Error(_shown(message, request), print_exception=False) from None


def _shown(message: str, request: gr.Request | None) -> str:
    """The page renders error messages as (sanitised) HTML, which would drop a quoted `<image>`:
    escape them for browsers (which send Sec-Fetch-* headers, and page scripts cannot fake them);
    API clients (gradio_client, curl) get the plain text."""
    headers = getattr(request, "headers", None) or {}
    return html.escape(message, quote=False) if "sec-fetch-mode" in headers else message


def build_app(service: InferenceService) -> gr.Blocks:
    """The page: three tabs whose buttons call the API events `/caption`, `/vqa`, `/retrieval`."""
    models = service.models
    limit = 2 * service.config.max_batch_size  # one batch running, the next one gathering

    def caption(image, prompt, num_beams, max_new_tokens, sample, top_p, temperature, request: gr.Request):
        return _respond(
            request,
            lambda: service.caption(
                upload_path(image),
                prompt=prompt,
                num_beams=num_beams,
                max_new_tokens=max_new_tokens,
                sample=sample,
                top_p=top_p,
                temperature=temperature,
            ),
        )

    def vqa(image, question, num_beams, max_new_tokens, request: gr.Request):
        return _respond(
            request,
            lambda: service.answer(
                upload_path(image), question, num_beams=num_beams, max_new_tokens=max_new_tokens
            ),
        )

    def retrieval(image, texts, score, request: gr.Request):
        def ranked_rows():
            ranked = service.rank(
                upload_path(image), texts, score=None if score in (None, "", "auto") else score
            )
            table = pd.DataFrame([[r[c] for c in RESULT_COLUMNS] for r in ranked], columns=RESULT_COLUMNS)
            # Shown with 4 decimals, as `blip retrieval` prints them; the API gets the full values.
            return table.style.format({"score": "{:.4f}", "probability": "{:.4f}"})

        return _respond(request, ranked_rows)

    with gr.Blocks(title="blip") as demo:
        gr.Markdown(
            "## blip: captioning, VQA and retrieval\n"
            f"Caption: `{models.describe('caption')}` · VQA: `{models.describe('vqa')}` · "
            f"Retrieval: `{models.describe('retrieval')}`. Models load on first use. "
            "The same functions are served as an API (see *Use via API* below)."
        )
        with gr.Tab("Caption", id="caption"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(
                        label="Image", type="filepath", sources=["upload"], elem_id="caption-image"
                    )
                    prompt = gr.Textbox(
                        "",
                        label="Prompt (optional)",
                        placeholder="a photography of",
                        info="The caption continues this text.",
                        elem_id="caption-prompt",
                    )
                    with gr.Accordion("Decoding", open=False):
                        num_beams = gr.Slider(1, 8, value=1, step=1, label="Beams (1 = greedy)")
                        max_new_tokens = gr.Slider(1, 100, value=30, step=1, label="Max length (new tokens)")
                        sample = gr.Checkbox(value=False, label="Sample instead of greedy / beam search")
                        top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p (with sampling)")
                        temperature = gr.Slider(
                            0.1, 2.0, value=1.0, step=0.1, label="Temperature (with sampling)"
                        )
                    button = gr.Button("Caption", variant="primary", elem_id="caption-button")
                with gr.Column():
                    output = gr.Textbox(label="Caption", elem_id="caption-output", interactive=False)
            button.click(
                caption,
                [image, prompt, num_beams, max_new_tokens, sample, top_p, temperature],
                output,
                api_name="caption",
                concurrency_limit=limit,
                concurrency_id="caption",
                preprocess=False,
            )
        with gr.Tab("VQA", id="vqa"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(label="Image", type="filepath", sources=["upload"], elem_id="vqa-image")
                    question = gr.Textbox(
                        label="Question", placeholder="what is in the picture?", elem_id="vqa-question"
                    )
                    with gr.Accordion("Decoding", open=False):
                        num_beams = gr.Slider(1, 8, value=1, step=1, label="Beams (1 = greedy)")
                        max_new_tokens = gr.Slider(1, 50, value=10, step=1, label="Max length (new tokens)")
                    button = gr.Button("Answer", variant="primary", elem_id="vqa-button")
                with gr.Column():
                    output = gr.Textbox(label="Answer", elem_id="vqa-output", interactive=False)
            button.click(
                vqa,
                [image, question, num_beams, max_new_tokens],
                output,
                api_name="vqa",
                concurrency_limit=limit,
                concurrency_id="vqa",
                preprocess=False,
            )
        with gr.Tab("Retrieval", id="retrieval"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(
                        label="Image", type="filepath", sources=["upload"], elem_id="retrieval-image"
                    )
                    texts = gr.Textbox(
                        label="Candidate texts, one per line",
                        lines=5,
                        placeholder="a dog on a beach\na cat on a sofa",
                        elem_id="retrieval-texts",
                    )
                    score = gr.Dropdown(
                        list(SCORES),
                        value="auto",
                        label="Score",
                        info="auto: itm+itc for ITM checkpoints, likelihood for generative BLIP-2.",
                    )
                    button = gr.Button("Rank", variant="primary", elem_id="retrieval-button")
                with gr.Column():
                    output = gr.Dataframe(
                        headers=RESULT_COLUMNS,
                        datatype=["number", "str", "number", "number"],
                        label="Ranked texts",
                        interactive=False,
                        elem_id="retrieval-output",
                    )
                    gr.Markdown("Best first; *probability* is the softmax of the scores over the candidates.")
            button.click(
                retrieval,
                [image, texts, score],
                output,
                api_name="retrieval",
                concurrency_limit=limit,
                concurrency_id="retrieval",
                preprocess=False,
            )
    return demo


# System fonts only: Gradio's default theme loads its fonts from Google, which a local tool (and a
# machine without network) should not depend on.
THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
)


@dataclass
class Server:
    """A running app (returned by `start`); `close()` stops the web server and the batchers."""

    demo: gr.Blocks
    service: InferenceService
    url: str

    def close(self) -> None:
        with contextlib.redirect_stdout(
            sys.stderr
        ):  # Gradio prints "Closing server..."; stdout is for results
            self.demo.close()
        self.service.close()


def serve(
    config: ServiceConfig, *, host: str = "127.0.0.1", port: int = 7860, auth: str | None = None
) -> None:
    """`blip ui`: serve until interrupted (Ctrl-C), then close the app and its batchers."""
    parse_auth(auth)  # a bad --auth is a usage error before anything starts
    start(InferenceService(config), host=host, port=port, auth=auth, block=True)


def start(
    service: InferenceService,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    auth: str | None = None,
    block: bool = False,
) -> Server:
    """Build the app and serve it on host:port. With `block`, serve until interrupted (then close)."""
    credentials = parse_auth(auth)
    size = service.config.max_batch_size
    demo = build_app(service)
    demo.queue(max_size=max(64, 8 * size), default_concurrency_limit=1)
    try:
        demo.launch(
            server_name=host,  # always explicit, so GRADIO_SERVER_NAME cannot widen it
            server_port=port,
            auth=credentials,
            prevent_thread_lock=True,
            quiet=True,
            show_error=False,
            ssr_mode=False,
            mcp_server=False,
            enable_monitoring=False,
            run_history=False,
            footer_links=["api"],
            max_file_size=MAX_FILE_SIZE,
            max_threads=max(40, 6 * size + 8),  # three tasks x (2 x max batch) waiting handlers
            theme=THEME,
        )
    except OSError as exc:  # Gradio's message talks about its own settings; say it in our terms
        service.close()
        raise BlipError(
            f"cannot listen on {host}:{port}: the port is in use or the address is not this machine's "
            "(choose another --port or --host)"
        ) from exc
    if credentials is None:
        where = "on this machine" if host in LOOPBACK else f"who can reach {host}"
        logger.warning(
            "no authentication: anyone %s can use the app and its API on port %d (pass --auth user:password)",
            where,
            port,
        )
    shown_host = f"[{host}]" if ":" in host else host
    server = Server(demo, service, f"http://{shown_host}:{port}/")
    logger.info("serving on %s (API: %s?view=api)", server.url, server.url)
    if block:
        try:
            with contextlib.redirect_stdout(sys.stderr):  # Gradio's own messages; stdout is for results
                demo.block_thread()
        finally:
            server.close()
    return server
