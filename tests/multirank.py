"""Multi-rank tests run on ranks forked from the test process (see megallava/local_ranks.py)."""
import megallava  # noqa: F401  (silences megatron's import-time warnings before the import below)
import megatron.core  # noqa: F401  (imported once in the parent so children inherit it)
from megallava.local_ranks import run_ranks  # noqa: F401
