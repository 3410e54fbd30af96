"""bitlm-mcp: bitlm's runs as tools of an MCP server."""
