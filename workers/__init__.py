"""The runtime: settings, broker and middleware, embedded defaults, email backends, CLI."""
