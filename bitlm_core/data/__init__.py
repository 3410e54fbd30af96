"""Data shipped with bitlm-core: the quickstart corpus and spec."""
