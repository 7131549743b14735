import sys
from pathlib import Path

# Test helpers (tests/hf_reference.py) import as plain modules.
sys.path.insert(0, str(Path(__file__).parent))
