"""babymerge: merge a text-only LM into a VLM to keep language-only performance (BabyLM)."""

__version__ = "0.1.0"
