"""HTTP service over a SPoT prompt library (FastAPI), and a client mirroring `library.Library`.

Depends on `library`, never on jax or `spot`.
"""

from retrieval_api.app import create_app, run
from retrieval_api.auth import TOKENS_ENV, load_tokens
from retrieval_api.client import ApiError, RetrievalClient

__all__ = ["TOKENS_ENV", "ApiError", "RetrievalClient", "create_app", "load_tokens", "run"]
