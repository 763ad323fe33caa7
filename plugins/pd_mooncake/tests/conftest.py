"""The end-to-end test borrows the repository's tiny random Llama fixture."""

from tests.conftest import tiny_llama_dir  # noqa: F401
