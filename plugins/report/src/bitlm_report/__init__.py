"""bitlm-report: report.html and PNG plots of bitlm runs."""
