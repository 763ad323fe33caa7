"""HTTP frontend and engine process of `pdcore serve`."""
