#!/usr/bin/env bash
# The `qless compare` report rendered by a real browser: writes docs/compare-report.png.
#
# It runs `qless compare` with every setting of the paper's Table 1, one of its Table 2 (absmean4 with
# the base model in NF4), a sweep over two percentages and three seeds, on
#   * a benchmark from `qless data build` (a 300-example pool of the real sources and the real targets;
#     its evaluation sets cut to their first subtasks, one item each), and
#   * a tiny random-init Llama (2 layers, hidden 64) with a byte-level tokenizer trained on the pool,
# so that it finishes within minutes on a CPU. Its accuracies therefore measure nothing: the screenshot
# shows the report, not results. The page is then opened in headless Chromium and the screenshot
# cropped to the page's content.
#
# Needs the dev virtualenv with the asset packages (README, "set up and run the test suite") and
# Debian's chromium:  apt-get update && apt-get install -y chromium
# Usage: docs/screenshot.sh [WORK_DIR]    (default /tmp/qless-screenshot; running it again resumes there)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(realpath -m "${1:-/tmp/qless-screenshot}")
mkdir -p "$WORK"

[ -f "$WORK/bench-full/manifest.json" ] || qless -q data build --out "$WORK/bench-full" --preset cpu --pool-size 300

python - "$WORK" <<'EOF'
"""The cut benchmark ($WORK/bench) and the tiny model ($WORK/model)."""
import json, shutil, sys
from pathlib import Path

work = Path(sys.argv[1])
full, bench, model_dir = work / "bench-full", work / "bench", work / "model"
KEEP = {"eval/mmlu_test.jsonl": 6, "eval/bbh.jsonl": 4, "eval/squad.jsonl": 6}  # first subtasks kept
if not (bench / "manifest.json").is_file():
    tmp = work / "bench.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(full, tmp)
    for rel, n in KEEP.items():
        rows = [json.loads(line) for line in (full / rel).read_text().split("\n") if line.strip()]
        subtasks = list(dict.fromkeys(r["subtask"] for r in rows))[:n]
        (tmp / rel).write_text("".join(json.dumps(r) + "\n" for r in rows if r["subtask"] in subtasks))
    tmp.rename(bench)
if not (model_dir / "config.json").is_file():
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [m["content"] for line in (bench / "pool.jsonl").read_text().split("\n") if line for m in json.loads(line)["messages"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<|endoftext|>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")
    cfg = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
EOF

qless compare --benchmark "$WORK/bench" --out "$WORK/compare" --preset cpu \
    --settings random balanced rds fp16 absmax8 absmax4 absmax2 absmean8 absmean4 absmean2 sign1 absmean4@nf4 \
    --seeds 0 1 2 --percents 5 10 \
    model.model="$WORK/model" model.dtype=float32 projection.dim=1024 \
    evaluate.limit=1 evaluate.mmlu_shots=1 evaluate.bbh_max_new_tokens=16 evaluate.squad_max_new_tokens=8

docs/screenshot-page.sh "$WORK/compare/compare.html" docs/compare-report.png
