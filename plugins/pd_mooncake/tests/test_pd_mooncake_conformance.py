"""pd_mooncake passes pdcore's transfer-backend conformance kit (skipped where mooncake is
not importable)."""

from __future__ import annotations

from pdcore.testing import conformance_test

test_conformance = conformance_test("mooncake")
