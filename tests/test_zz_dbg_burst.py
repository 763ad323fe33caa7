import time, asyncio, httpx
from test_router_gateway import *  # noqa

def test_dbg(fakes, tmp_path):
    for w in fakes.values():
        w.delay = 2.0
    flags = both(fakes, "--max-concurrent-requests", "4", "--queue-size", "4", *QUIET_HEALTH)
    with router(tmp_path, *flags) as r:
        async def main():
            limits = httpx.Limits(max_connections=None)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                t0 = time.monotonic()
                async def one(i):
                    a = await client.post(r.url + "/generate", json={"text": f"q{i}"})
                    return (round(time.monotonic() - t0, 2), a.status_code, a.text[:80])
                return await asyncio.gather(*(one(i) for i in range(20)))
        for x in sorted(asyncio.run(main())): print(x)
        print(len(fakes["D0"].bodies) + len(fakes["D1"].bodies))
        assert 0
