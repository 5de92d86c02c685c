"""Per-example LoRA gradients: one batched backward (qless) vs one backward per example (LESS).

All paths run in the same process, in float32, on the same random-weight Llama built from a
config (SmolLM2-135M's shape by default) with LoRA on q/k/v/o, over the same examples, and the
script prints examples/s for each and their ratios. The loop baseline is what the LESS reference
code does: forward one unpadded example, ``loss.backward()``, read and flatten ``.grad``. The
qless path is also run one example per call, to separate the gain of batching from the rest
(logits computed at label positions only, no parameter ``.grad`` accumulation).

    python benchmarks/bench_gradients.py                    # default: about 40 s on 2 idle CPU cores
    python benchmarks/bench_gradients.py --layers 4 --rounds 2             # quick
    python benchmarks/bench_gradients.py --device cuda --batch-size 32 --rounds 8 --loop-per-round 8
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import peft
import torch
import transformers

from qless.gradients import PerExampleGradients, lora_parameters


def build_model(args: argparse.Namespace) -> peft.PeftModel:
    """A random-weight Llama of the requested shape with LoRA on q/k/v/o, float32, eval mode."""
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.seq_len),
        tie_word_embeddings=True,
    )
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32)
    lora = peft.LoraConfig(
        r=args.rank, lora_alpha=4 * args.rank, lora_dropout=0.1,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False,
    )  # fmt: skip
    return peft.get_peft_model(model, lora).to(args.device).eval()


def make_examples(n: int, args: argparse.Namespace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n examples of 3/4 to all of seq_len tokens; the first ~40% is a prompt without loss."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    out = []
    for _ in range(n):
        length = int(torch.randint(3 * args.seq_len // 4, args.seq_len + 1, (1,), generator=gen))
        ids = torch.randint(0, args.vocab, (length,), generator=gen)
        labels = ids.clone()
        labels[: int(0.4 * length)] = -100
        out.append((ids, labels))
    return out


def collate(examples: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the batch."""
    t = max(len(ids) for ids, _ in examples)
    ids = torch.zeros(len(examples), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, (x, y) in enumerate(examples):
        ids[b, : len(x)], mask[b, : len(x)], labels[b, : len(y)] = x, 1, y
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loop_gradients(model: peft.PeftModel, examples, device: str) -> torch.Tensor:
    """LESS-style: one forward and one backward per example, gradients read from .grad. [n, d]"""
    params = [p for _, p in lora_parameters(model)]
    rows = []
    for ids, labels in examples:
        loss = model(input_ids=ids[None].to(device), labels=labels[None].to(device), use_cache=False).loss
        loss.backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in params]))
        for p in params:
            p.grad = None
    return torch.stack(rows)


def batched_gradients(pe: PerExampleGradients, examples, batch_size: int) -> torch.Tensor:
    """qless: one forward and one backward per batch of batch_size examples. [n, d]"""
    rows = [pe(collate(examples[i : i + batch_size]))[0] for i in range(0, len(examples), batch_size)]
    return torch.cat(rows)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    """(result, seconds) of fn(), synchronising the device around it."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128, help="longest example (lengths: 3/4 to all of it)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per backward on the batched path")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; each runs one batch on both paths")
    parser.add_argument(
        "--loop-per-round", type=int, default=3, help="examples of each round's batch also run one per backward"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not 1 <= args.loop_per_round <= args.batch_size:
        parser.error("--loop-per-round must be between 1 and --batch-size")

    t0 = time.perf_counter()
    model = build_model(args)
    pe = PerExampleGradients(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, peft {peft.__version__}, "
        f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
        + f"; 1-min load average {os.getloadavg()[0]:.1f} (other processes skew CPU timings)"
    )
    print(
        f"model: Llama {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, {n_params / 1e6:.1f}M params, "
        f"float32; LoRA r={args.rank} on q/k/v/o, d = {pe.dim:,}; built in {time.perf_counter() - t0:.1f} s"
    )
    examples = make_examples((args.rounds + 1) * args.batch_size, args)
    print(f"examples: {args.seq_len * 3 // 4}-{args.seq_len} tokens, the last 60% of each with loss")

    # Warm up both paths (allocator, kernels, the batched path's one-time self-check).
    warm = examples[: args.batch_size]
    loop_gradients(model, warm[:1], args.device)
    batched_gradients(pe, warm[:1], 1)
    batched_gradients(pe, warm, args.batch_size)

    # Interleave the two paths round by round (alternating which goes first), so that a change
    # in machine load during the run affects both alike.
    total_s = {"loop": 0.0, "single": 0.0, "batched": 0.0}
    count = {"loop": 0, "single": 0, "batched": 0}
    err = 0.0
    for r in range(args.rounds):
        batch = examples[(r + 1) * args.batch_size : (r + 2) * args.batch_size]
        head = batch[: args.loop_per_round]
        runs = {
            "loop": (lambda: loop_gradients(model, head, args.device), len(head)),
            "single": (lambda: batched_gradients(pe, head, 1), len(head)),
            "batched": (lambda: batched_gradients(pe, batch, args.batch_size), len(batch)),
        }
        out = {}
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            fn, n = runs[name]
            out[name], seconds = timed(fn, args.device)
            total_s[name] += seconds
            count[name] += n
        ref = out["loop"]
        for name in ("single", "batched"):
            got = out[name][: len(ref)]
            err = max(err, ((got - ref).norm(dim=1) / ref.norm(dim=1)).max().item())

    rate = {name: count[name] / total_s[name] for name in total_s}
    labels = {
        "loop": "loop, 1 example per backward (LESS)",
        "single": "qless path, 1 example per backward",
        "batched": f"qless path, {args.batch_size} examples per backward",
    }
    for name, label in labels.items():
        print(f"{label:<40s} {count[name]:4d} examples in {total_s[name]:7.2f} s = {rate[name]:6.2f} examples/s")
    print(
        f"speed-up over the loop: batched {rate['batched'] / rate['loop']:.2f}x "
        f"(of which batching alone {rate['batched'] / rate['single']:.2f}x, label-position-only logits etc. "
        f"{rate['single'] / rate['loop']:.2f}x)"
    )
    print(f"1-min load average at the end: {os.getloadavg()[0]:.1f}")
    print(f"agreement with the loop on the {count['loop']} examples run by all: max relative L2 error {err:.1e}")


if __name__ == "__main__":
    main()
