"""`blip ui`: the web page and API (wiring only; the app is `blip_toolkit.ui`)."""

from __future__ import annotations

from typing import Annotated

import typer

from blip_toolkit.cli.derive import derived, options
from blip_toolkit.cli.options import MaxPixelsOpt
from blip_toolkit.data.image_defaults import DEFAULT_MAX_PIXELS
from blip_toolkit.models.spec import LoadSpec

EXTRA_HINT = "blip ui needs the ui extra: pip install 'blip-toolkit[ui]'"


@derived(load=options(LoadSpec, exclude=("quantize",), panel="Model"))
def ui(
    *,
    load: LoadSpec,
    vqa_model: Annotated[
        str | None,
        typer.Option(
            "--vqa-model", help="Checkpoint for VQA. \\[default: --model if it can do VQA, else per task]"
        ),
    ] = None,
    retrieval_model: Annotated[
        str | None,
        typer.Option(
            "--retrieval-model",
            help="Checkpoint for retrieval. \\[default: --model if it can rank texts, else per task]",
        ),
    ] = None,
    host: Annotated[
        str,
        typer.Option(
            "--host", help="Address to listen on; anything but 127.0.0.1 is reachable from outside."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 7860,
    max_batch_size: Annotated[
        int, typer.Option("--max-batch-size", min=1, help="Most concurrent requests run as one batch.")
    ] = 8,
    auth: Annotated[
        str | None,
        typer.Option(
            "--auth",
            help="user:password required by the page and the API (Gradio's login; visible to local users in the process list).",
            show_default=False,
        ),
    ] = None,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
) -> None:
    """Serve captioning, VQA and retrieval as a local web page and API (Gradio).

    Needs the ui extra: pip install 'blip-toolkit\\[ui]'. Models load once, on first use.

    Concurrent requests are batched, up to --max-batch-size per model call, and give what blip caption, vqa and retrieval give for the same image and options.

    Listens on 127.0.0.1 unless --host says otherwise; without --auth it warns that anyone who can reach the port can use it.

    [bold]Examples[/]

      blip ui
      blip ui --model Salesforce/blip2-opt-2.7b --port 8000
      blip ui --host 0.0.0.0 --auth alice:secret --max-batch-size 16
    """
    from blip_toolkit.errors import BlipError
    from blip_toolkit.ui.service import ServiceConfig

    try:
        from blip_toolkit.ui.app import serve
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in ("gradio", "gradio_client"):
            raise BlipError(EXTRA_HINT) from exc
        raise
    config = ServiceConfig(
        load=load,
        vqa_model=vqa_model,
        retrieval_model=retrieval_model,
        max_batch_size=max_batch_size,
        max_pixels=max_pixels,
    )
    serve(config, host=host, port=port, auth=auth)


def register(app: typer.Typer) -> None:
    app.command("ui")(ui)
