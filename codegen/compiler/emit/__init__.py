"""C emission: loop trees (`loopnest`), expressions (`printer`), files via Jinja (`render`)."""
