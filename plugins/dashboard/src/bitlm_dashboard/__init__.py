"""bitlm-dashboard: a local web page of bitlm runs."""
