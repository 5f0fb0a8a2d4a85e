import evaluate
from evaluate.utils import launch_gradio_widget

import uae_hf  # noqa: F401  (registers the module so the bare name resolves to this folder's code)

module = evaluate.load("unified_bench")
launch_gradio_widget(module)
