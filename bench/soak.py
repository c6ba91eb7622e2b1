"""`python -m bench.soak`: the real service for a simulated month against the simulator, with
faults, compared with the truth (docs/soak.md). The engine lives in tests/soak.py, which the short
soak of tests/test_soak.py runs too.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.soak import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
