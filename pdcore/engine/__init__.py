"""The engine: KV page pool, prefix cache, scheduler, model runner, sampling and the loop."""
