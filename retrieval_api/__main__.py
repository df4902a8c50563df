"""`python -m retrieval_api --library DIR [--host 127.0.0.1] [--port 8000]`: serve a prompt library."""

from __future__ import annotations

import argparse

from library import KINDS
from retrieval_api.app import run
from retrieval_api.limits import DEFAULT_MAX_PROMPT_LENGTH, DEFAULT_MAX_UPLOAD_BYTES


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m retrieval_api", description=__doc__)
    parser.add_argument("--library", required=True, help="library directory (created if absent)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--tokens-file", help="bearer tokens, one per line (default: $SPOT_API_TOKENS)"
    )
    parser.add_argument(
        "--private-reads", action="store_true", help="require a token for reads too"
    )
    parser.add_argument(
        "--public-status",
        action="store_true",
        help="with --private-reads, still show entry counts on /healthz and /metrics to anyone",
    )
    parser.add_argument(
        "--read-only", action="store_true", help="serve reads only (automatic if not writable)"
    )
    parser.add_argument("--max-upload-bytes", type=int, default=DEFAULT_MAX_UPLOAD_BYTES)
    parser.add_argument(
        "--max-prompt-length",
        type=int,
        default=DEFAULT_MAX_PROMPT_LENGTH,
        help="longest prompt (L) a publish or query may hold",
    )
    parser.add_argument(
        "--index",
        choices=KINDS,
        default="flat",
        help="exact (flat) or approximate (hnsw, ivf) search",
    )
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    run(
        args.library,
        host=args.host,
        port=args.port,
        tokens_file=args.tokens_file,
        open_reads=not args.private_reads,
        max_upload_bytes=args.max_upload_bytes,
        max_prompt_length=args.max_prompt_length,
        index_kind=args.index,
        read_only=args.read_only,
        public_status=args.public_status,
        log_level=args.log_level,
    )


if __name__ == "__main__":
    main()
