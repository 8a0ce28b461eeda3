"""mmcompose: multimodal LLMs composed from existing models (NaiveMC, DAMC) and frozen
unimodal models aligned by a mixture-of-experts connector (Alt-MoE)."""

__version__ = "0.1.0"

# transformers' AutoConfig / AutoModelForCausalLM / AutoProcessor load mmcompose folders once
# their modules are imported (registered then, so this import stays free of torch).
from mmcompose import _auto_hook

_auto_hook.install()
