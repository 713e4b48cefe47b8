"""A bidirectional recurrent tagger for named-entity recognition (torch only; no web or database code)."""

__version__ = "0.1.0"
