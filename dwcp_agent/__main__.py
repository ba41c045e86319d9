"""`python -m dwcp_agent` is the `dwcp-agent` command."""

from dwcp_agent.cli import main

raise SystemExit(main())
