#!/usr/bin/env bash
# All tests: the workspace (unit and end-to-end tests of the real binary),
# then the plugins' own unit tests (natively).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --workspace
(cd plugins && cargo test --release)
