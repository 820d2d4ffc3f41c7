"""`blip ui`: a local web page and API (Gradio) for captioning, VQA and retrieval.

`service` holds the models and batches concurrent requests (no web code); `app` builds the Gradio
page and API on top of it (needs the `ui` extra: `pip install blip-toolkit[ui]`).
"""

import os

# No telemetry and no version check: these machines have no network, and a local tool should not
# call home. Set before gradio is first imported (by `blip_toolkit.ui.app`).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
