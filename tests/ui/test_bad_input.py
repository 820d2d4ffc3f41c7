"""Bad input through the API: a readable one-line error for that request only (no traceback), and
the server goes on serving, including the good requests that were batched with a bad one."""

from __future__ import annotations

import pytest


def _file(path):
    from gradio_client import handle_file

    return handle_file(str(path))


def refused(call) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        call()
    message = str(info.value)
    assert "Traceback" not in message and "/tmp/" not in message  # one line, no server paths
    assert len(message.splitlines()) == 1
    return message


def test_bad_uploads_and_questions_are_refused_and_the_server_keeps_serving(client, bad_files, sample_images):
    good = sample_images[0]
    expected = client.predict(_file(good), api_name="/caption")

    message = refused(lambda: client.predict(_file(bad_files["text"]), api_name="/caption"))
    assert message == "notes.jpg: not an image (unrecognised format)"
    message = refused(lambda: client.predict(_file(bad_files["bomb"]), api_name="/caption"))
    assert message.startswith("bomb.png: refused, 100000x100000 = 10000000000 pixels is over the limit")
    message = refused(lambda: client.predict(_file(bad_files["bomb"]), "what is it?", api_name="/vqa"))
    assert "over the limit" in message

    assert refused(lambda: client.predict(_file(good), "", api_name="/vqa")) == "the question is empty"
    assert refused(lambda: client.predict(_file(good), "   ", api_name="/vqa")) == "the question is empty"
    # BLIP-2 fills its <image> placeholders by position: user text must not add one.
    message = refused(lambda: client.predict(_file(good), "what is <image> here?", api_name="/vqa"))
    assert message == "the question contains '<image>', which this model reserves; remove it"
    assert (
        refused(lambda: client.predict(None, "what?", api_name="/vqa"))
        == "no image given: upload an image first"
    )
    message = refused(lambda: client.predict(_file(good), "\n \n", "auto", api_name="/retrieval"))
    assert message == "no candidate texts given (one per line)"
    message = refused(lambda: client.predict(_file(good), "a cat", "likelihood", api_name="/retrieval"))
    assert message.startswith("--score likelihood needs a generative BLIP-2 checkpoint")
    message = refused(lambda: client.predict(_file(good), num_beams=0, api_name="/caption"))
    assert message == "--num-beams must be at least 1"

    assert client.predict(_file(good), api_name="/caption") == expected
    assert client.predict(_file(good), "what is it?", api_name="/vqa")


def test_a_bad_request_does_not_fail_the_good_ones_batched_with_it(
    client, ui_server, bad_files, sample_images
):
    from gradio_client.exceptions import AppError

    images = sample_images[:5]
    sequential = [client.predict(_file(p), max_new_tokens=10, api_name="/caption") for p in images]
    uploads = images[:3] + [bad_files["text"]] + images[3:]
    expected = sequential[:3] + ["error: notes.jpg: not an image (unrecognised format)"] + sequential[3:]
    for _ in range(3):  # until the bad upload shares a batch (it nearly always does at once)
        ui_server.service.calls.clear()
        jobs = [client.submit(_file(p), max_new_tokens=10, api_name="/caption") for p in uploads]
        results = []
        for job in jobs:
            try:
                results.append(job.result(timeout=120))
            except AppError as exc:
                results.append(f"error: {exc}")
        assert results == expected
        if any(c.failed == 1 and c.requests > 1 for c in ui_server.service.calls):
            break
    else:
        pytest.fail(f"the bad upload never shared a batch: {ui_server.service.calls}")
