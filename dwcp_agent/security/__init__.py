"""Channel security: cluster PKI, TLS on the agent ports, bounded pre-authentication work."""
