"""The HTTP edge shared by the model server and the router: error bodies and handlers,
JSON body parsing, port checks, server-sent events. Imports neither `pdcore.server` nor
`pdcore.engine` (import-linter enforces it), so the router can use it and stay light."""
