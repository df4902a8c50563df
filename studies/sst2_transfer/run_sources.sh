#!/usr/bin/env bash
# Train and publish the library's sources with one config (see README.md here).
set -euo pipefail
cd "$(dirname "$0")"
for task in sst5 mpqa trec; do
  spot train-source --task "$task" --config source.json --out "sources/$task" --library library
done
