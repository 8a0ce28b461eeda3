"""mmcompose: multimodal LLMs composed from existing models (NaiveMC, DAMC) and frozen
unimodal models aligned by a mixture-of-experts connector (Alt-MoE)."""

__version__ = "0.1.0"
