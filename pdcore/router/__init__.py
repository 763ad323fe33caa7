"""The PD router: `pdcore router --pd-disaggregation --prefill URL [PORT] --decode URL`.

A light process (starlette, uvicorn, httpx; never torch) that speaks SGLang's router wire
protocol: each request goes to a prefill and a decode server at once, with the bootstrap
fields that pair them, and the client gets decode's answer. See docs/router.md.

Modules: settings (flags and env vars), policies (routing policies), legs (one HTTP call to
a worker and how it fails), pd (the two-leg request), app (routes), metrics, launch; and for
`--router-processes N`: supervisor (the supervising process), cluster (a router process's
link to it), shared_admission (flow control in shared memory).
"""
