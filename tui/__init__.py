"""`localserve tui`: a Textual terminal UI over a localserve server's HTTP API (installed as
`localserve.tui`). It pulls, quantizes and deletes models through the server's store routes
and watches the server through /api/status and the /api/events stream; it never reaches into
the engine."""
