"""SPoT prompt library: the prompt file format, prompt similarity and a searchable prompt store.

Depends only on numpy, safetensors and faiss (never on jax or `spot`).
"""

from library.errors import EntryNotFound, LibraryCorrupt, LibraryError
from library.index import KINDS, IndexKind
from library.manifest import Entry
from library.prompt_file import (
    ROLES,
    PromptFileError,
    check_prompt,
    decode_prompt,
    encode_prompt,
    export_peft,
    import_npy,
    import_peft,
    load_prompt,
    save_prompt,
)
from library.protocol import RECIPES, KeyProtocol, ProtocolMismatch
from library.similarity import DEFAULT_METRIC, METRICS, pool, similarity, top_k
from library.store import Library, Match, NoProtocolWarning, Published, VerifyReport

__all__ = [
    "KINDS",
    "DEFAULT_METRIC",
    "METRICS",
    "RECIPES",
    "ROLES",
    "Entry",
    "EntryNotFound",
    "IndexKind",
    "KeyProtocol",
    "Library",
    "LibraryCorrupt",
    "LibraryError",
    "Match",
    "NoProtocolWarning",
    "PromptFileError",
    "ProtocolMismatch",
    "Published",
    "VerifyReport",
    "check_prompt",
    "decode_prompt",
    "encode_prompt",
    "export_peft",
    "import_npy",
    "import_peft",
    "load_prompt",
    "pool",
    "save_prompt",
    "similarity",
    "top_k",
]
