"""Make `fastfill_udfs` importable when a pipeline runs from a checkout without `pip install`."""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
