"""Extraction throughput: qless's path vs a LoRA training step (the floor) vs the LESS reference way.

In one run, on the same model, examples, LoRA, dtype and projection dimension k: examples/s and
tokens/s (non-padding input tokens) of three ways to get projected per-example LoRA gradients.

* ``qless``: the extraction path minus disk I/O: the real ``Extractor._chunk`` (``_micro_batches``,
  :class:`PerExampleGradients`, buffered :class:`Projector` passes), then :func:`quantize` into every
  format; gradients, projection and quantization timed apart. Target-set rows (no Adam direction).
* ``floor``: a LoRA training step on the same batches, logits at the label positions only (the
  head trick of PerExampleGradients), backward into ``.grad``: no per-example gradients, no projection.
* ``less``: one unpadded forward/backward per example, ``.grad`` flattened; every 16 examples a dense
  Rademacher projection regenerated in [d, 128] blocks from per-block seeds (TRAK's BasicProjector
  on CPU). Slow, so it runs on ``--less-examples`` only.

Check: qless's rows match LESS's gradients projected by qless's Projector, and the floor's batch
gradient matches the sum of qless's rows of that batch. Paths run one after the other (qless,
floor, less): keep the machine otherwise idle.

    python benchmarks/bench_extract.py                                   # SmolLM2-135M, 64 pool examples
    python benchmarks/bench_extract.py --examples 8 --less-examples 2 --k 1024          # quick
    python benchmarks/bench_extract.py --random-config --layers 16 --hidden 2048 --heads 32 --kv-heads 8 \\
        --intermediate 8192 --vocab 128256 --device cuda --batch-size 32 --max-batch-tokens 8192 --examples 512
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from qless.data import DataConfig, Tokenized, collate, load_examples, tokenize_examples
from qless.errors import DataError
from qless.extraction import DEFAULT_FORMATS, ExtractConfig, Extractor, _micro_batches
from qless.gradients import IGNORE_INDEX, VERIFY_RTOL_LOW_PRECISION, PerExampleGradients, lora_parameters
from qless.models import AdapterConfig, ModelConfig, attach_lora, load_model, load_tokenizer, native_bfloat16, resolve_device
from qless.project import ProjectionConfig, Projector
from qless.project.logra import project_rows
from qless.quantize import quantize

LESS_INTERVAL, LESS_BLOCK = 16, 128  # LESS projects every 16 examples; TRAK regenerates R in 128-column blocks


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timed:
    """A callable wrapped so that its synchronised wall time adds up in ``seconds``."""

    def __init__(self, fn, device: torch.device, **attrs) -> None:
        self.fn, self.device, self.seconds = fn, device, 0.0
        self.__dict__.update(attrs)

    def __call__(self, *args):
        sync(self.device)
        t = time.perf_counter()
        out = self.fn(*args)
        sync(self.device)
        self.seconds += time.perf_counter() - t
        return out


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """Base model (embedded SmolLM2-135M or a random Llama) with a fresh LoRA adapter, eval mode."""
    if args.random_config:
        import transformers

        cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                       num_key_value_heads=args.kv_heads, max_position_embeddings=max(4096, args.max_length),
                                       tie_word_embeddings=True)
        torch.manual_seed(args.seed)
        with device:
            base = transformers.LlamaForCausalLM(cfg)
        base = base.to(dtype).eval()
        name = f"random Llama ({args.layers} layers, hidden {args.hidden}, vocab {args.vocab})"
    else:
        base, _, identity = load_model(ModelConfig(model="embedded", dtype=str(dtype).removeprefix("torch."), device=str(device)))
        name = identity["source"]
    torch.manual_seed(args.seed)
    model = attach_lora(base, AdapterConfig(r=args.rank, alpha=4.0 * args.rank, dropout=0.0))
    with torch.no_grad():  # lora_B starts at zero, which would zero every lora_A gradient: make it look trained
        for pname, p in lora_parameters(model):
            if "lora_B" in pname:
                p.normal_(std=0.02)
    n_params = sum(p.numel() for p in base.parameters())
    return model.eval(), {"name": name, "num_parameters": n_params, "rank": args.rank, "alpha": 4.0 * args.rank}


def synthetic(n: int, args: argparse.Namespace, vocab: int) -> list[Tokenized]:
    """n examples of max_length/4 to max_length tokens; the first 40% is a prompt without loss."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    items = []
    for _ in range(n):
        length = int(torch.randint(args.max_length // 4, args.max_length + 1, (1,), generator=gen))
        ids = torch.randint(0, vocab, (length,), generator=gen).tolist()
        cut = int(0.4 * length)
        items.append(Tokenized(None, ids, [IGNORE_INDEX] * cut + ids[cut:], False))
    return items


def load_items(args: argparse.Namespace, n: int, vocab: int) -> tuple[list[Tokenized], int, str]:
    """(items, pad id, description): the embedded pool, a .jsonl pool, or synthetic examples."""
    pool = args.pool or ("synthetic" if args.random_config else "embedded")
    if pool != "synthetic":
        tok = load_tokenizer(ModelConfig(model="embedded"))
        if len(tok) > vocab:
            sys.exit(f"--pool {pool}: the SmolLM2 tokenizer has {len(tok)} tokens, more than --vocab {vocab}")
        try:
            if pool == "embedded":
                from qless.embedded import BenchmarkConfig, build_benchmark

                with tempfile.TemporaryDirectory() as tmp:
                    build_benchmark(Path(tmp) / "b", BenchmarkConfig(pool_size=max(400, n)))  # the cpu preset's pool
                    examples = load_examples(Path(tmp) / "b" / "pool.jsonl")
            else:
                examples = load_examples(pool)
        except DataError as e:
            print(f"pool {pool} unavailable ({str(e).splitlines()[0]}); using synthetic examples")
            return synthetic(n, args, vocab), 0, "synthetic"
        items, _ = tokenize_examples(examples, tok, DataConfig(max_length=args.max_length), progress=False, log_summary=False)
        if len(items) < n:
            sys.exit(f"pool {pool}: only {len(items)} examples have a response token within {args.max_length} tokens")
        return items[:n], tok.pad_token_id, f"{pool} pool, first {n}"
    return synthetic(n, args, vocab), 0, "synthetic"


def run_qless(pe: PerExampleGradients, items, xcfg: ExtractConfig, proj_cfg: ProjectionConfig, pad: int, device):
    """Extractor._chunk (the real code) with its gradients and projector timed, then quantization.
    LoGra projects inside the gradient hooks: its projection time is part of the gradients' time."""
    ex = Extractor.__new__(Extractor)  # the chunk loop without checkpoints or stores
    if pe.logra is not None:
        projector, out_dim = None, pe.dim
    else:
        plain = Projector(proj_cfg, pe.dim, device)
        projector, out_dim = Timed(plain, device, out_dim=plain.out_dim), plain.out_dim
    ex.__dict__.update(cfg=xcfg, grads=Timed(pe, device), projector=projector, out_dim=out_dim,
                       tokenizer=SimpleNamespace(pad_token_id=pad),
                       buffer_rows=max(1, min(xcfg.chunk_size, xcfg.buffer_mb * 2**20 // (4 * pe.dim))))
    specs = [s for s in xcfg.specs if s.scale == "row"]
    out, quant_s = [], 0.0
    sync(device)
    t0 = time.perf_counter()
    for c0 in range(0, len(items), xcfg.chunk_size):
        chunk = items[c0:c0 + xcfg.chunk_size]
        rows, bad = ex._chunk(chunk, None)
        t = time.perf_counter()
        good = [i for i in range(len(chunk)) if i not in bad]
        for spec in specs:
            quantize(rows[good], spec)
        quant_s += time.perf_counter() - t
        out.append(rows)
    seconds = time.perf_counter() - t0
    return torch.cat(out), {"seconds": seconds, "gradient_s": ex.grads.seconds,
                            "projection_s": 0.0 if projector is None else projector.seconds,
                            "quantization_s": quant_s}


def floor_step(model, batch: dict[str, torch.Tensor], device) -> None:
    """One LoRA training step's forward/backward: body -> hidden states, head at label positions only,
    per-example mean cross-entropy summed over the batch, backward into the LoRA params' .grad."""
    base = model.get_base_model()
    body, head = getattr(base, base.base_model_prefix), base.get_output_embeddings()
    model.zero_grad(set_to_none=True)
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    hidden = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    keep = labels[:, 1:] != IGNORE_INDEX
    token_loss = F.cross_entropy(head(hidden[:, :-1][keep]).float(), labels[:, 1:][keep], reduction="none")
    sums = torch.zeros(ids.shape[0], device=device).index_add_(0, keep.nonzero()[:, 0], token_loss)
    (sums / keep.sum(dim=1)).sum().backward()


def run_floor(model, items, xcfg: ExtractConfig, pad: int, device) -> dict[str, float]:
    sync(device)
    t0 = time.perf_counter()
    for c0 in range(0, len(items), xcfg.chunk_size):
        chunk = items[c0:c0 + xcfg.chunk_size]
        for ids in _micro_batches(chunk, xcfg):
            floor_step(model, collate([chunk[i] for i in ids], pad), device)
    sync(device)
    model.zero_grad(set_to_none=True)
    return {"seconds": time.perf_counter() - t0}


def trak_project(rows: torch.Tensor, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """TRAK BasicProjector: R [d, k] regenerated in [d, 128] Rademacher blocks, one generator seed per block."""
    out = torch.empty(rows.shape[0], k, dtype=dtype, device=rows.device)
    block = torch.empty(rows.shape[1], LESS_BLOCK, dtype=dtype, device=rows.device)
    gen = torch.Generator(rows.device)
    x = rows.to(dtype)
    for i, c in enumerate(range(0, k, LESS_BLOCK)):
        gen.manual_seed(seed + i)
        block.bernoulli_(0.5, generator=gen).mul_(2).sub_(1)
        w = min(LESS_BLOCK, k - c)
        out[:, c:c + w] = x @ block[:, :w]
    return out


def run_less(model, params, items, k: int, dtype, device, keep: int = 0):
    """One unpadded forward/backward per example, .grad flattened; projected every 16 examples."""
    kept, pending, proj_s = [], [], 0.0
    model.zero_grad(set_to_none=True)
    sync(device)
    t0 = time.perf_counter()
    for i, it in enumerate(items):
        ids, labels = (torch.tensor([v], device=device) for v in (it.input_ids, it.labels))
        model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
        g = torch.cat([p.grad.reshape(-1) for p in params])
        model.zero_grad(set_to_none=True)
        pending.append(g)
        if i < keep:
            kept.append(g.float())
        if len(pending) == LESS_INTERVAL or i == len(items) - 1:
            sync(device)
            t = time.perf_counter()
            trak_project(torch.stack(pending), k, dtype)
            sync(device)
            proj_s += time.perf_counter() - t
            pending = []
    sync(device)
    return kept, {"seconds": time.perf_counter() - t0, "projection_s": proj_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = (("examples", 64), ("k", 8192), ("batch-size", 4), ("max-batch-tokens", 1024), ("chunk-size", 128),  # cpu preset
            ("max-length", 256), ("rank", 8), ("warmup-rounds", 1), ("seed", 0),  # LoRA r on q/k/v/o, alpha 4r
            ("layers", 30), ("hidden", 576), ("heads", 9), ("kv-heads", 3), ("intermediate", 1536), ("vocab", 49152))  # random Llama
    for name, default in ints:
        p.add_argument(f"--{name}", type=int, default=default, help=f"default {default}")
    p.add_argument("--less-examples", type=int, default=None, help="examples of the slow LESS path (default min(N, 16))")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: bfloat16 where native, else float32")
    p.add_argument("--proj-dtype", choices=("float32", "bfloat16"), default="float32", help="qless projection compute dtype")
    p.add_argument("--kind", choices=("rademacher", "gaussian", "sparse", "logra"), default="rademacher",
                   help="qless projection kind (sparse: cost independent of k; logra: per-layer, inside the hooks, "
                        "plain gradients, k set by --side; LESS then projects to the same k)")
    p.add_argument("--side", type=int, default=16, help="logra: side size s of each LoRA factor (default 16)")
    p.add_argument("--nnz", type=int, default=1, help="sparse: non-zeros per input coordinate (default 1, CountSketch)")
    p.add_argument("--formats", nargs="+", default=list(DEFAULT_FORMATS))
    p.add_argument("--pool", default=None, help="embedded (default for the embedded model), synthetic, or a .jsonl file")
    p.add_argument("--random-config", action="store_true", help="a random-init Llama of the --layers ... --vocab shape")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    device = resolve_device(args.device)
    args.dtype = args.dtype or ("bfloat16" if native_bfloat16(device) else "float32")
    dtype = getattr(torch, args.dtype)
    n, n_less = args.examples, min(args.less_examples or min(args.examples, LESS_INTERVAL), args.examples)

    model, model_info = build_model(args, device, dtype)
    vocab = model.get_input_embeddings().num_embeddings
    items, pad, data_desc = load_items(args, n, vocab)
    params = [q for _, q in lora_parameters(model)]
    xcfg = ExtractConfig(formats=tuple(args.formats), batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
                         chunk_size=args.chunk_size)
    if args.kind == "logra":
        proj_cfg = ProjectionConfig(kind="logra", dim=args.side, compute_dtype=args.proj_dtype)
        pe = PerExampleGradients(model, projection=proj_cfg)
        layout = PerExampleGradients(model).layout()
        args.k = pe.dim  # LESS's way projects to the same k

        def projector(rows: torch.Tensor) -> torch.Tensor:
            return project_rows(pe.logra, rows.to(device), [r[4] for r in layout], [r[5] for r in layout])
    else:
        proj_cfg = ProjectionConfig(kind=args.kind, dim=args.k, compute_dtype=args.proj_dtype,
                                    nnz=args.nnz if args.kind == "sparse" else 1)
        pe = PerExampleGradients(model)
        projector = Projector(proj_cfg, pe.dim, device)
    tokens = [len(it.input_ids) for it in items]
    machine = {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
               "dtype": args.dtype, "load_average": os.getloadavg()[0], "command": shlex.join(sys.argv)}
    print(f"machine: {machine}")
    print(f"model: {model_info['name']}, {model_info['num_parameters'] / 1e6:.1f}M params, {args.dtype}, LoRA r={args.rank} "
          f"on q/k/v/o, d = {pe.input_dim:,}, k = {args.k} ({args.kind}"
          f"{f', nnz {args.nnz}' if args.kind == 'sparse' else ''}); data: {data_desc}, {n} examples, {sum(tokens)} tokens "
          f"({min(tokens)}-{max(tokens)} per example); batches of <= {args.batch_size} examples / {args.max_batch_tokens} tokens")

    w, small_k = min(n, args.batch_size), dataclasses.replace(proj_cfg, dim=LESS_BLOCK)  # the timed kind, at a small k
    for _ in range(args.warmup_rounds):  # untimed: allocator, kernels, PerExampleGradients' self-check; projections at small k
        run_qless(pe, items[:w], xcfg, small_k, pad, device)
        run_floor(model, items[:w], xcfg, pad, device)
        run_less(model, params, items[:1], LESS_BLOCK, dtype, device)

    qrows, res_q = run_qless(pe, items, xcfg, proj_cfg, pad, device)
    res_f = run_floor(model, items, xcfg, pad, device)
    kept, res_l = run_less(model, params, items[:n_less], args.k, dtype, device, keep=min(n_less, 4))
    results = {"qless": res_q, "floor": res_f, "less": res_l}
    for name, r in results.items():
        r["examples"] = n_less if name == "less" else n
        r["tokens"] = sum(tokens[:r["examples"]])
        r["examples_per_s"], r["tokens_per_s"] = r["examples"] / r["seconds"], r["tokens"] / r["seconds"]
        r["vs_floor"] = r["tokens_per_s"] / (sum(tokens) / res_f["seconds"])
    share = (res_q["projection_s"] + res_q["quantization_s"]) / res_q["seconds"]
    res_q["proj_quant_share"] = share

    # correctness: the three paths compute the same gradients
    ref = projector(torch.stack(kept)).cpu()
    err_less = float(((qrows[:len(kept)] - ref).norm(dim=1) / ref.norm(dim=1)).max())
    first = _micro_batches(items[:args.chunk_size], xcfg)[0]
    floor_step(model, collate([items[i] for i in first], pad), device)
    g = projector(torch.cat([q.grad.reshape(-1) for q in params]).float()[None]).cpu()[0]
    model.zero_grad(set_to_none=True)
    err_floor = float((qrows[first].sum(dim=0) - g).norm() / g.norm())
    tol = 1e-4 if dtype == torch.float32 else VERIFY_RTOL_LOW_PRECISION  # bf16: padded batch vs one example rounds apart
    check = {"qless_vs_less_max_rel_err": err_less, "rows": len(kept), "floor_vs_qless_sum_rel_err": err_floor, "tol": tol,
             "ok": err_less <= tol and err_floor <= tol}

    print(f"\n{'path':<6} {'examples':>8} {'tokens':>7} {'seconds':>8} {'examples/s':>11} {'tokens/s':>10} {'vs floor':>9}")
    for name, r in results.items():
        extra = ""
        if name == "qless":
            extra = (f"  gradients {r['gradient_s']:.2f} s, projection {r['projection_s']:.2f} s, quantization "
                     f"{r['quantization_s']:.2f} s: projection+quantization {100 * share:.1f}% of the total")
        if name == "less":
            extra = f"  of which TRAK-style projection {r['projection_s']:.2f} s ({100 * r['projection_s'] / r['seconds']:.0f}%)"
        print(f"{name:<6} {r['examples']:>8} {r['tokens']:>7} {r['seconds']:>8.2f} {r['examples_per_s']:>11.2f} "
              f"{r['tokens_per_s']:>10.0f} {r['vs_floor']:>8.2f}x{extra}")
    q_floor, q_less = res_q["vs_floor"], res_q["tokens_per_s"] / res_l["tokens_per_s"]
    print(f"\nqless / floor: {q_floor:.2f}x   qless / less: {q_less:.2f}x   (tokens/s)")
    targets = {"qless >= 90% of floor": q_floor >= 0.9, "projection+quantization < 10% of qless": share < 0.1,
               "qless >= 10x less (CUDA)": q_less >= 10 if device.type == "cuda" else None}
    for what, met in targets.items():
        print(f"target {what}: {'n/a on CPU' if met is None else 'met' if met else 'NOT met'}")
    print(f"check: qless rows vs LESS gradients through qless's Projector, max relative error {err_less:.2e} over {len(kept)} "
          f"rows; floor batch gradient vs sum of qless rows {err_floor:.2e}; tolerance {tol:g}: {'ok' if check['ok'] else 'FAILED'}")
    record = {"machine": machine, "model": {**model_info, "d": pe.input_dim},
              "settings": {k: v for k, v in vars(args).items() if k != "json_out"} | {"less_examples": n_less, "data": data_desc},
              "results": results, "ratios": {"qless_vs_floor": q_floor, "qless_vs_less": q_less}, "targets": targets, "check": check}
    line = json.dumps(record)
    print(line)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    if not check["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
