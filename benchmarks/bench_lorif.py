"""LoRIF against the exact damped Gauss-Newton influence, and LoRIF's bytes and query time on SmolLM2.

``tiny``: a ~1M-parameter random Llama (hidden 128, 3 layers; its own byte-level BPE) with a LoRA
warmup on a sample of the demo's real pool, so that every quantity can be computed exactly. The
exact influence of pool example z on target z' at each checkpoint is ``g_z'^T H^-1 g_z`` with
``g`` the per-example gradient of the captured layers' whole weights (unprojected, float64, one
example at a time), ``H = G^T G / N + lambda I`` over the pool in that full space (lambda = 0.1 x
its mean eigenvalue, the same rule LoRIF's curvature uses), solved exactly through the ``N x N``
push-through identity ``(G^T G / N + lambda I)^-1 = (I - G^T (N lambda I + G G^T)^-1 G) / lambda``.
Aggregated per task like every qless score (mean within subtask, max over subtasks, lr-weighted
checkpoints), it is compared by Spearman and top-5% / top-10% recall with:

* LoRIF over a (c, r) sweep, and with its factors quantized to 8, 4, 2 and 1 bits;
* the dense two-sided (LoGra-style) projection at the same D: LoRIF's factors at full rank c = s are
  the projected layer gradients themselves, so its scores are the dense ones (query time measured
  on a dense store of those rows, scored the dense way);
* qless's LESS cosine on plain LoRA gradients, unprojected (projection none);
* the exact gradients without curvature (raw inner products, and cosines).

``smollm2``: the real embedded SmolLM2 at the demo's warmup checkpoints, a small pool sample and a
few dozen targets: bytes per example and query (scoring) time of LoRIF at c = 1..8 against the dense
projected store at the same D = sum of s x s blocks, with and without curvature, plus how LoRIF's
scores agree with the dense ones.

    python benchmarks/bench_lorif.py tiny --run-dir /tmp/fresh/runs/demo --out /tmp/bench-lorif-tiny
    python benchmarks/bench_lorif.py smollm2 --run-dir /tmp/fresh/runs/demo --out /tmp/bench-lorif-smollm2

Each prints a markdown table and writes ``results.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from qless.data import DataConfig, collate, load_examples, tokenize_examples
from qless.extraction import ExtractConfig, extract
from qless.gradients import _mean_label_losses  # the loss extraction differentiates: mean over response tokens
from qless.lorif.curvature import CurvatureConfig, fit_curvature_folder, read_curvatures
from qless.lorif.factors import FactorLayout
from qless.lorif.score import lorif_score
from qless.lorif.stores import all_factor_rows, store_layout
from qless.models import AdapterConfig, ModelConfig, load_adapter, load_model
from qless.project import ProjectionConfig
from qless.quantize import QuantizerSpec, quantize
from qless.scoring import ScoreConfig, aggregate_reference, checkpoint_weights, score
from qless.store import Datastore, ShardWriter, finalize, new_manifest, open_by_checkpoint
from qless.training import WarmupConfig, warmup

FORMATS = ("absmax8", "absmean4", "absmean2", "sign1")


# -- data ----------------------------------------------------------------------------------------


def sample_data(run_dir: Path, out: Path, n_pool: int, per_task: dict[str, int], seed: int) -> tuple[Path, Path]:
    """A seeded sample of the demo's pool and the first rows of each target file, as JSONL files."""
    bench = run_dir / "benchmark"
    pool = [json.loads(line) for line in open(bench / "pool.jsonl")]
    random.Random(seed).shuffle(pool)
    targets = []
    for task, n in per_task.items():
        targets += [json.loads(line) for line in open(bench / "targets" / f"{task}.jsonl")][:n]
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("pool.jsonl", pool[:n_pool]), ("targets.jsonl", targets)):
        with open(out / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return out / "pool.jsonl", out / "targets.jsonl"


def tiny_model(folder: Path, texts: list[str], hidden: int, layers: int, vocab: int) -> Path:
    """A random-init Llama with a byte-level BPE trained on ``texts``, saved as a local model folder."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")
    cfg = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _texts(path: Path) -> list[str]:
    out = []
    for line in open(path):
        r = json.loads(line)
        out += [m["content"] for m in r["messages"]] if "messages" in r else [r["prompt"], r["completion"]]
    return out


# -- stores derived from a full-rank factor store ------------------------------------------------


def derive_factor_store(src: Datastore, dst: Path, rank: int, tag: str) -> Datastore:
    """The rank-``rank`` LoRIF store in format ``tag`` derived from a full-rank fp32 one: each layer's
    first ``rank`` factor columns are the top-``rank`` balanced SVD factors (factorize sorts them), so
    this equals extracting at rank ``rank``."""
    if (dst / "manifest.json").exists():
        return Datastore.open(dst)
    layout = store_layout(src)
    rows = all_factor_rows(src, dtype=torch.float32)
    small = FactorLayout([(lay.name, lay.k_out, lay.k_in) for lay in layout.layers], rank)
    cut = small.join([(u[..., :rank], v[..., :rank]) for u, v in layout.split(rows)])
    spec = QuantizerSpec.parse(tag)
    m = src.manifest
    ident = {**m["projection"], "rank": rank, "dim": small.width}
    manifest = new_manifest(projection=ident, quantizer=spec, checkpoint=m["checkpoint"], gradient=m["gradient"],
                            model=m["model"], adapter=m["adapter"], tokenization=m["tokenization"], extra=m["extra"],
                            warmup_checkpoints=m["warmup"]["checkpoints"])
    writer = ShardWriter(dst, manifest, "00000")
    table = list(src.rows())
    for a in range(0, len(cut), 256):
        codes, scales = quantize(cut[a:a + 256], spec)
        writer.append(codes, scales, table[a:a + 256], consumed=writer.consumed + len(codes))
    writer.finish()
    finalize(dst)
    return Datastore.open(dst)


def derive_all(src_root: Path, dst_root: Path, rank: int, tag: str) -> dict[str, list[Datastore]]:
    out = {}
    for name in ("pool", "target"):
        out[name] = [derive_factor_store(s, dst_root / f"c{rank}-{tag}" / name / s.checkpoint, rank, tag)
                     for s in open_by_checkpoint([src_root / name])]
    return out


# -- exact influence -----------------------------------------------------------------------------


def layer_gradients(model, names: list[str], items, pad_id: int) -> np.ndarray:
    """float64 ``[n, sum out * in]``: each example's gradient of the named layers' whole (base) weights,
    one unpadded example at a time (the slow, obvious reference)."""
    ref = copy.deepcopy(model).double().eval()
    modules = dict(ref.named_modules())
    weights = []
    for n in names:
        w = modules[n].get_base_layer().weight
        w.requires_grad_(True)
        weights.append(w)
    rows = []
    for item in items:
        batch = collate([item], pad_id)
        logits = ref(input_ids=batch["input_ids"], use_cache=False).logits
        loss = _mean_label_losses(logits, batch["labels"])[0]
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, weights)]).numpy())
    return np.stack(rows)


def exact_influence(gp: np.ndarray, gt: np.ndarray, damping: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """``[n_pool, n_target]`` float64 ``g_t^T (G^T G / N + lambda I)^-1 g_p`` with ``G = gp`` through the
    ``N x N`` identity (= ``N (N lambda I + G G^T)^-1 G gt^T``), lambda = damping x trace / D; and the raw
    inner products ``gp gt^T``."""
    n, d = gp.shape
    k = gp @ gp.T
    lam = damping * np.trace(k) / (n * d)
    c = gp @ gt.T
    return n * np.linalg.solve(n * lam * np.eye(n) + k, c), c


# -- agreement -----------------------------------------------------------------------------------


def agreement(approx: dict[str, np.ndarray], exact: dict[str, np.ndarray]) -> dict[str, float]:
    """Spearman and top-5% / top-10% recall per task, and their mean and worst over tasks."""
    out: dict[str, float] = {}
    per = {"spearman": [], "recall@5": [], "recall@10": []}
    for task in exact:
        a, e = np.asarray(approx[task], dtype=np.float64), exact[task]
        per["spearman"].append(float(spearmanr(a, e).statistic))
        for pct in (5, 10):
            k = max(1, int(np.ceil(len(e) * pct / 100)))
            top_a, top_e = set(np.argsort(-a, kind="stable")[:k]), set(np.argsort(-e, kind="stable")[:k])
            per[f"recall@{pct}"].append(len(top_a & top_e) / k)
    for key, vals in per.items():
        out[key] = float(np.mean(vals))
        out[key + "_min"] = float(np.min(vals))
    return out


def timed(fn, repeats: int = 2):
    """``(result, best wall seconds)`` over ``repeats`` runs (the first also warms the page cache)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return result, best


def lorif_run(stores: dict[str, list[Datastore]], curvature: Path | None, repeats: int = 2, block_rows: int = 2048):
    cfg = ScoreConfig(method="lorif", curvature=str(curvature) if curvature else "none", block_rows=block_rows)
    result, seconds = timed(lambda: lorif_score(stores["pool"], stores["target"], cfg, progress=False), repeats)
    return result.aggregate("max"), seconds


def fit(stores: dict[str, list[Datastore]], folder: Path, rank: int, scope: str = "layer") -> Path:
    if not folder.exists():
        fit_curvature_folder([s.path for s in stores["pool"]], folder, CurvatureConfig(rank=rank, scope=scope),
                             progress=False)
    return folder


# -- dense projected store (LoGra-style), the same D -------------------------------------------


def write_dense(full: dict[str, list[Datastore]], folder: Path, dtype: str = "float16", replicate: int = 1) -> dict[str, list[Path]]:
    """Each store's projected layer gradients ``vec(U V^T)`` (exact at full rank) as a ``[n, D]`` array on
    disk (the pool's rows repeated ``replicate`` times, for timing)."""
    out: dict[str, list[Path]] = {"pool": [], "target": []}
    folder.mkdir(parents=True, exist_ok=True)
    for name, stores in full.items():
        for s in stores:
            times = replicate if name == "pool" else 1
            path = folder / f"{name}-x{times}-{s.checkpoint}.npy"
            if not path.exists():
                g = store_layout(s).reconstruct(all_factor_rows(s, dtype=torch.float64)).numpy().astype(dtype)
                np.save(path, np.tile(g, (times, 1)), allow_pickle=False)
            out[name].append(path)
    return out


def replicated(stores: dict[str, list[Datastore]], times: int) -> dict[str, list[Datastore]]:
    """The pool stores opened ``times`` times over as one (the same rows repeated), for timing."""
    return {"pool": [Datastore.open(*[s.path] * times) for s in stores["pool"]], "target": stores["target"]}


def dense_score(dense: dict[str, list[Path]], full: dict[str, list[Datastore]], curvature: Path | None,
                block_rows: int = 2048) -> dict[str, np.ndarray]:
    """Scores from the dense store, the dense way: per checkpoint the targets are preconditioned once
    (Woodbury on the dense target rows) and folded into one weighted vector per subtask, then each block
    of pool rows costs one ``[m, D] x [D, S]`` matmul. The same maths as LoRIF's scorer."""
    from qless.scoring import target_groups

    groups = target_groups(list(full["target"][0].rows()))
    eta = checkpoint_weights([p.learning_rate for p in full["pool"]])
    curvs = read_curvatures(curvature) if curvature else None
    n = np.load(dense["pool"][0], mmap_mode="r").shape[0]
    values = np.zeros((n, len(groups.subtasks)), dtype=np.float32)
    for p_path, t_path, p, w in zip(dense["pool"], dense["target"], full["pool"], eta):
        gt = torch.from_numpy(np.load(t_path).astype(np.float32))
        if curvs is not None:
            curv = curvs[p.checkpoint]
            q = torch.zeros_like(gt)
            offsets = np.cumsum([0] + [lay.dim for lay in curv.layout.layers])
            for block, lam in zip(curv.blocks, curv.dampings()):
                cols = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in block.layers])
                vec = block.eigenvectors.float()
                part = gt[:, cols]
                shrink = (block.eigenvalues / (block.eigenvalues + lam)).float()
                q[:, cols] = (part - ((part @ vec.T) * shrink) @ vec) / lam
            gt = q
        counts = np.bincount(groups.row_group, minlength=len(groups.subtasks))
        mean = np.zeros((len(gt), len(groups.subtasks)), dtype=np.float32)
        mean[np.arange(len(gt)), groups.row_group] = w / counts[groups.row_group]
        subtask = gt.T @ torch.from_numpy(mean)  # [D, S]
        pool = np.load(p_path, mmap_mode="r")
        for a in range(0, n, block_rows):
            block = torch.from_numpy(np.asarray(pool[a:a + block_rows], dtype=np.float32))
            values[a:a + len(block)] += (block @ subtask).numpy()
    from qless.scoring import aggregate

    return aggregate(values, groups, "max")


# -- the two benchmarks --------------------------------------------------------------------------


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")


def run_tiny(args) -> dict:
    out = Path(args.out)
    pool_file, target_file = sample_data(Path(args.run_dir), out / "data", args.pool_size, args.targets, args.seed)
    model_dir = out / "model"
    if not (model_dir / "config.json").exists():
        tiny_model(model_dir, _texts(pool_file) + _texts(target_file), args.hidden, args.layers, 1024)
    model_cfg = ModelConfig(model=str(model_dir), dtype="float32", device="cpu")
    data_cfg = DataConfig(max_length=256)
    target_cfg = DataConfig(max_length=256, truncation="left")
    pool, targets = load_examples(pool_file), load_examples(target_file)
    t0 = time.perf_counter()
    ckpts = warmup(pool, out / "warmup", WarmupConfig(percent=25, epochs=2, learning_rate=1e-3, batch_size=16,
                                                      micro_batch_size=16, seed=args.seed),
                   model_cfg, AdapterConfig(r=8, alpha=16, dropout=0.0), data_cfg, progress=False)
    sets = {"pool": (pool, "pool"), "target": (targets, "target")}
    ext = ExtractConfig(formats=("fp32",), pool_gradient="sgd", batch_size=8, chunk_size=64)
    s = args.side
    for folder, proj in (("less", ProjectionConfig(kind="none")),
                         ("lorif-full", ProjectionConfig(kind="lorif", dim=s, rank=s, seed=args.seed))):
        if not (out / folder / "fp32" / "pool").exists():
            extract(sets, ckpts, out / folder, ext, proj, model_cfg, data_cfg, target_data_cfg=target_cfg, progress=False)
    prep_seconds = time.perf_counter() - t0

    # the exact influence, per checkpoint, then aggregated like every qless score
    full = {name: open_by_checkpoint([out / "lorif-full" / "fp32" / name]) for name in ("pool", "target")}
    base, tok, _ = load_model(model_cfg)
    model = load_adapter(base, ckpts[0].path)
    from qless.lorif.capture import capture_layers
    from qless.models import set_adapter_weights

    names = [n for n, _, _, _ in capture_layers(model, "lora")]
    d_full = sum(o * i for _, _, o, i in capture_layers(model, "lora"))
    eta = checkpoint_weights([c.learning_rate for c in ckpts])
    t_rows = list(full["target"][0].rows())
    exact = plain = cos = None
    t1 = time.perf_counter()
    for ckpt, w, p_store, t_store in zip(ckpts, eta, full["pool"], full["target"]):
        set_adapter_weights(model, ckpt.path)
        grads = {}
        for name, examples, cfg, store in (("pool", pool, data_cfg, p_store), ("target", targets, target_cfg, t_store)):
            items, _ = tokenize_examples(examples, tok, cfg, progress=False)
            keys = [(str(r["source"]), str(r["id"])) for r in store.rows()]  # the store's rows, in its order
            index = {(it.example.source, it.example.id): it for it in items}
            grads[name] = layer_gradients(model, names, [index[k] for k in keys], tok.pad_token_id)
        infl, raw = exact_influence(grads["pool"], grads["target"])
        gp, gt = grads["pool"], grads["target"]
        cosine = (gp / np.linalg.norm(gp, axis=1, keepdims=True)) @ (gt / np.linalg.norm(gt, axis=1, keepdims=True)).T
        exact = w * infl if exact is None else exact + w * infl
        plain = w * raw if plain is None else plain + w * raw
        cos = w * cosine if cos is None else cos + w * cosine
    exact_seconds = time.perf_counter() - t1
    exact_tasks = aggregate_reference(exact, t_rows, "max")
    rows = [{"setting": "exact, no curvature (raw inner product)", "bytes": 4 * d_full + 4,
             **agreement(aggregate_reference(plain, t_rows, "max"), exact_tasks)},
            {"setting": "exact, no curvature (cosine)", "bytes": 4 * d_full + 4,
             **agreement(aggregate_reference(cos, t_rows, "max"), exact_tasks)}]

    # LESS cosine on plain LoRA gradients, unprojected
    less = {name: open_by_checkpoint([out / "less" / "fp32" / name]) for name in ("pool", "target")}
    res, secs = timed(lambda: score(less["pool"], less["target"], ScoreConfig(), progress=False))
    rows.append({"setting": f"LESS cosine, LoRA gradients, projection none (k = {less['pool'][0].k})",
                 "bytes": less["pool"][0].row_bytes + 4, "seconds": secs, **agreement(res.aggregate("max"), exact_tasks)})

    layout = store_layout(full["pool"][0])
    d_proj = layout.dim
    # the dense projected store at the same D (LoRIF at full rank holds exactly these gradients)
    dense = write_dense(full, out / "dense")
    for r in [None, *args.ranks]:
        curv = fit(full, out / "curv" / f"full-r{r}", r) if r else None
        agg, secs = lorif_run(full, curv)
        dense_agg, dense_secs = timed(lambda: dense_score(dense, full, curv))
        rows.append({"setting": f"dense projected (LoGra), s = {s}, D = {d_proj}, r = {r or 'none'}",
                     "c": "dense", "r": r or 0, "bytes": 2 * d_proj, "seconds": dense_secs,
                     **agreement(dense_agg, exact_tasks)})
        check = agreement(agg, dense_agg)
        assert check["spearman_min"] > 0.999, f"LoRIF at full rank should score as the dense store: {check}"
    # the (c, r) sweep, float32 factors
    for c in args.cs:
        stores = derive_all(out / "lorif-full" / "fp32", out / "derived", c, "fp32")
        for r in [None, *args.ranks]:
            curv = fit(stores, out / "curv" / f"c{c}-fp32-r{r}", r) if r else None
            agg, secs = lorif_run(stores, curv)
            rows.append({"setting": f"LoRIF c = {c}, r = {r or 'none'} (fp32 factors)", "c": c, "r": r or 0,
                         "bytes": stores["pool"][0].row_bytes + 4, "seconds": secs, **agreement(agg, exact_tasks)})
    # quantized factors
    for c in args.quant_cs:
        for tag in ("fp16", *FORMATS):
            stores = derive_all(out / "lorif-full" / "fp32", out / "derived", c, tag)
            curv = fit(stores, out / "curv" / f"c{c}-{tag}-r{args.quant_rank}", args.quant_rank)
            agg, secs = lorif_run(stores, curv)
            rows.append({"setting": f"LoRIF c = {c}, r = {args.quant_rank}, {tag}", "c": c, "r": args.quant_rank,
                         "format": tag, "bytes": stores["pool"][0].row_bytes + 4, "seconds": secs,
                         **agreement(agg, exact_tasks)})
        # one curvature over all layers at once instead of one per layer
        stores = derive_all(out / "lorif-full" / "fp32", out / "derived", c, "fp32")
        r = max(args.ranks)
        agg, secs = lorif_run(stores, fit(stores, out / "curv" / f"c{c}-fp32-r{r}-all", r, "all"))
        rows.append({"setting": f"LoRIF c = {c}, r = {r} over all layers jointly (fp32 factors)", "c": c, "r": r,
                     "bytes": stores["pool"][0].row_bytes + 4, "seconds": secs, **agreement(agg, exact_tasks)})
    return {"benchmark": "tiny", "machine": machine(), "pool": full["pool"][0].n_rows,
            "targets": full["target"][0].n_rows, "tasks": list(exact_tasks), "checkpoints": [c.name for c in ckpts],
            "side": s, "D_projected": d_proj, "D_full": d_full, "layers": len(layout.layers),
            "model_parameters": sum(p.numel() for p in base.parameters()),
            "prep_seconds": prep_seconds, "exact_seconds": exact_seconds, "rows": rows}


def run_smollm2(args) -> dict:
    from qless.stages import run_extract, warmup_defaults

    out = Path(args.out)
    run_dir = Path(args.run_dir)
    pool_file, target_file = sample_data(run_dir, out / "data", args.pool_size, args.targets, args.seed)
    model_cfg, data_cfg = warmup_defaults(run_dir / "warmup")
    s = args.side
    t0 = time.perf_counter()
    if not (out / "lorif-full" / "fp32" / "target").exists():
        run_extract(run_dir / "warmup", {"pool": ([pool_file], "pool"), "target": ([target_file], "target")},
                    out / "lorif-full", ExtractConfig(formats=("fp32",), pool_gradient="sgd", batch_size=4,
                                                      max_batch_tokens=1024, chunk_size=32),
                    ProjectionConfig(kind="lorif", dim=s, rank=s, seed=args.seed), model=model_cfg, data=data_cfg,
                    target_data=DataConfig(**{**data_cfg.__dict__, "truncation": "left"}), progress=True)
    extract_seconds = time.perf_counter() - t0
    full = {name: open_by_checkpoint([out / "lorif-full" / "fp32" / name]) for name in ("pool", "target")}
    layout = store_layout(full["pool"][0])
    times = args.replicate
    dense = write_dense(full, out / "dense", replicate=times)
    rows = []
    for r in (None, args.smollm2_rank):
        curv = fit(full, out / "curv" / f"full-r{r}", r) if r else None
        dense_agg, dense_secs = timed(lambda: dense_score(dense, full, curv, args.block_rows), args.repeats)
        rows.append({"setting": f"dense projected, D = {layout.dim}, fp16, r = {r or 'none'}", "c": "dense",
                     "r": r or 0, "bytes": 2 * layout.dim, "seconds": dense_secs})
        for c in args.cs:
            stores = derive_all(out / "lorif-full" / "fp32", out / "derived", c, "fp16")
            curv_c = fit(stores, out / "curv" / f"c{c}-fp16-r{r}", r) if r else None
            agg, secs = lorif_run(replicated(stores, times), curv_c, args.repeats, args.block_rows)
            rows.append({"setting": f"LoRIF c = {c}, fp16, r = {r or 'none'}", "c": c, "r": r or 0,
                         "bytes": stores["pool"][0].row_bytes + 4, "seconds": secs,
                         "bytes_vs_dense": (stores["pool"][0].row_bytes + 4) / (2 * layout.dim),
                         "time_vs_dense": secs / dense_secs,
                         **{f"vs_dense_{k}": v for k, v in agreement(agg, dense_agg).items()}})
    return {"benchmark": "smollm2", "machine": machine(), "pool": full["pool"][0].n_rows,
            "targets": full["target"][0].n_rows, "checkpoints": [p.checkpoint for p in full["pool"]], "side": s,
            "D_projected": layout.dim, "layers": len(layout.layers), "extract_seconds": extract_seconds,
            "timed_pool_rows": full["pool"][0].n_rows * times, "block_rows": args.block_rows, "rows": rows}


def table(result: dict) -> str:
    keys = [k for k in ("bytes", "seconds", "bytes_vs_dense", "time_vs_dense", "spearman", "spearman_min", "recall@5",
                        "recall@5_min", "recall@10", "vs_dense_spearman", "vs_dense_spearman_min", "vs_dense_recall@5")
            if any(k in r for r in result["rows"])]
    lines = ["| setting | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in result["rows"]:
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append("" if v is None else f"{v:,}" if k == "bytes" else f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append(f"| {r['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("which", choices=("tiny", "smollm2"))
    parser.add_argument("--run-dir", default="runs/demo", help="a finished `qless demo` run (its benchmark and warmup)")
    parser.add_argument("--out", required=True, help="work folder (re-running reuses what is there)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool-size", type=int, default=None, help="pool sample (tiny: 300, smollm2: 64)")
    parser.add_argument("--side", type=int, default=None, help="LoRIF side s (tiny: 32, smollm2: 32)")
    parser.add_argument("--targets", nargs="+", default=("mmlu=20", "bbh=15", "squad=9"), metavar="TASK=N",
                        help="the first N rows of each target file (4 MMLU subjects, 5 BBH tasks, 9 SQuAD rows)")
    parser.add_argument("--hidden", type=int, default=128, help="tiny model width")
    parser.add_argument("--layers", type=int, default=3, help="tiny model depth")
    parser.add_argument("--cs", type=int, nargs="+", default=None, help="factor ranks c (tiny: 1 2 4 8; smollm2: 1 2 4 8)")
    parser.add_argument("--ranks", type=int, nargs="+", default=(16, 64, 256), help="curvature ranks r (tiny)")
    parser.add_argument("--quant-cs", type=int, nargs="+", default=(4,), help="factor ranks quantized (tiny)")
    parser.add_argument("--quant-rank", type=int, default=64, help="curvature rank of the quantized rows (tiny)")
    parser.add_argument("--smollm2-rank", type=int, default=32, help="curvature rank r (smollm2)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats (the best is kept)")
    parser.add_argument("--replicate", type=int, default=16, help="smollm2: pool rows repeated this many times for timing")
    parser.add_argument("--block-rows", type=int, default=256, help="smollm2: pool rows scored at a time")
    args = parser.parse_args()
    args.pool_size = args.pool_size or (300 if args.which == "tiny" else 64)
    args.side = args.side or 32
    args.cs = args.cs or [1, 2, 4, 8]
    args.targets = {t.split("=")[0]: int(t.split("=")[1]) for t in args.targets}
    result = run_tiny(args) if args.which == "tiny" else run_smollm2(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    print(table(result))


if __name__ == "__main__":
    main()
