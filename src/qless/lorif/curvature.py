"""LoRIF's curvature: a rank-r eigendecomposition of the Gauss-Newton proxy, fitted in one pass over a factor store.

Influence functions precondition with the inverse of the loss curvature. LoRIF takes the
(uncentred) empirical Fisher of the projected layer gradients, ``A = G^T G / N`` (``G [N, D]``
the examples' projected gradients of one layer, ``D = k_out k_in``), keeps its top r
eigenpairs ``A ~ V diag(lam) V^T`` (``V [D, r]`` orthonormal) and inverts the damped matrix by
Woodbury, ``(A + lambda I)^-1 = (I - V diag(lam / (lam + lambda)) V^T) / lambda``
(:mod:`qless.lorif.score`), never forming a ``D x D`` matrix: memory ``O(D r)``.

The eigenpairs come from a Nystrom sketch fitted while streaming the store once (Tropp,
Yurtsever, Udell, Cevher 2017, "Fixed-rank approximation of a positive-semidefinite matrix from
streaming data", Algorithm 3): with ``Omega [D, s]`` a seeded Gaussian test matrix with
orthonormal columns (``s = r + oversample``), accumulate ``Y = A Omega = sum_i g_i (g_i^T Omega) / N``
from each block's gradients ``g_i = vec(U_i V_i^T)`` (rebuilt per block from the stored factors:
D is small, 64 x 64 at side 64); then, with a small shift ``nu`` for numerical stability,
``Y_nu = Y + nu Omega``, ``B = Omega^T Y_nu = C C^T`` (Cholesky), ``E = Y_nu C^-T``, ``E = W S Q^T``
(thin SVD), and ``A ~ W diag(max(S^2 - nu, 0)) W^T``, truncated to rank r. The approximation is
exact when ``rank(A) <= s`` (up to the shift, ~1e-15 of ||A||) and otherwise within the paper's
bound of the best rank-r approximation.

Scope ``layer`` (default) fits one block per layer (a block-diagonal curvature, as LoGra and
LoRIF do); ``all`` fits one block over the concatenation of every layer. Each block also keeps
``trace(A)``, exact from the same pass: the damping default is ``lambda = damping x trace / D``,
a multiple of the block's mean eigenvalue (0.1, the default of LogIX, the LoGra authors' code).

An artefact per checkpoint store: ``OUT/<checkpoint>/curvature.safetensors`` (eigenvalues
``[r]`` and eigenvectors ``[r, D]`` per block, float64 so that the vectors stay orthonormal to
1e-16, which Woodbury assumes) and ``curvature.json`` (the store's
projection, checkpoint, model and adapter identity, what it was fitted from, the settings).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from qless import __version__
from qless.config import Config, option, to_dict
from qless.console import progress_bar
from qless.errors import ConfigError, StoreError, StoreMismatchError
from qless.files import atomic_folder, dumps, read_json, safe_name
from qless.lorif.factors import FactorLayout
from qless.lorif.stores import factor_rows, require_factor_stores, store_layout
from qless.store import Datastore, require_same
from qless.store.derive import content_digest

log = logging.getLogger(__name__)

CURVATURE_FORMAT = "qless-lorif-curvature"
#: Manifest fields the curvature must share with the stores it preconditions.
IDENTITY_FIELDS = ("projection", "checkpoint", "model", "adapter")


@dataclass(frozen=True)
class CurvatureConfig(Config):
    """How the curvature is fitted (``qless fit-curvature``)."""

    section = "curvature"

    rank: int = option(64, "r: eigenpairs kept per block (capped at the block's D)")
    oversample: int = option(10, "extra columns of the Nystrom sketch beyond r (s = r + oversample; capped at D)")
    scope: Literal["layer", "all"] = option("layer", "one eigendecomposition per layer (block-diagonal, as LoRIF), or one "
                                            "of the concatenation of every layer")
    damping: float = option(0.1, "default damping recorded with the fit: lambda = damping x the block's mean eigenvalue "
                            "(trace / D); `qless score --damping` overrides it")
    seed: int = option(0, "seed of the Gaussian test matrix")
    block_rows: int = option(512, "store rows read at a time (memory: block_rows x D float64 per block)")
    device: str = option("cpu", "device of the sketch arithmetic: cpu, cuda or auto")

    def validate(self) -> None:
        for name in ("rank", "block_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"curvature.{name} must be a positive integer, got {getattr(self, name)}")
        if self.oversample < 0:
            raise ConfigError(f"curvature.oversample must be 0 or more, got {self.oversample}")
        if not self.damping > 0:
            raise ConfigError(f"curvature.damping must be positive, got {self.damping}")


@dataclass
class CurvatureBlock:
    """One block of the curvature: ``A_b ~ eigenvectors^T diag(eigenvalues) eigenvectors`` over the
    concatenated projected gradients of ``layers`` (indices into the layout), ``D = dim``."""

    layers: list[int]
    eigenvalues: torch.Tensor  # [r] descending, >= 0
    eigenvectors: torch.Tensor  # [r, D], orthonormal rows
    trace: float  # trace(A_b), exact

    @property
    def dim(self) -> int:
        return int(self.eigenvectors.shape[1])

    @property
    def mean_eigenvalue(self) -> float:
        return self.trace / self.dim


@dataclass
class Curvature:
    """The fitted blocks of one checkpoint's store, with the identity and settings of the fit."""

    layout: FactorLayout
    blocks: list[CurvatureBlock]
    meta: dict[str, Any]

    @property
    def checkpoint(self) -> str:
        return self.meta["identity"]["checkpoint"]["name"]

    def dampings(self, damping: float | None = None) -> list[float]:
        """lambda of each block: ``damping`` (default: the fit's) x the block's mean eigenvalue."""
        rel = self.meta["damping"] if damping is None else damping
        if not rel > 0:
            raise ConfigError(f"score.damping must be positive, got {rel}")
        return [rel * b.mean_eigenvalue for b in self.blocks]


def layer_blocks(layout: FactorLayout, scope: str) -> list[list[int]]:
    """Layer indices of each curvature block: one per layer, or one of all."""
    if scope not in ("layer", "all"):
        raise ConfigError(f"curvature.scope {scope!r}: use 'layer' or 'all'")
    n = len(layout.layers)
    return [[i] for i in range(n)] if scope == "layer" else [list(range(n))]


def block_gradients(layout: FactorLayout, rows: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    """``[m, D_b]``: the projected gradients ``vec(U V^T)`` of ``layers`` rebuilt from factor ``rows [m, width]``."""
    split = layout.split(rows)
    return torch.cat([(split[i][0] @ split[i][1].transpose(1, 2)).reshape(len(rows), -1) for i in layers], dim=1)


def sketch_matrix(dim: int, cols: int, gen: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``Omega [dim, cols]``: a seeded Gaussian matrix with orthonormal columns (QR), the Nystrom test matrix."""
    q, r = torch.linalg.qr(torch.randn(dim, cols, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)  # the sign fix makes Q a function of the draw alone


def nystrom(y: torch.Tensor, omega: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` eigenpairs of a PSD ``A`` from its sketch ``y = A omega`` (Tropp et al. 2017,
    Alg. 3), in float64: ``(eigenvalues [rank] descending, eigenvectors [D, rank])``."""
    y, omega = y.to(torch.float64), omega.to(torch.float64)
    nu = math.sqrt(y.shape[0]) * torch.finfo(torch.float64).eps * float(torch.linalg.matrix_norm(y, ord=2))
    if nu == 0.0:  # A = 0 on the sketch: no direction to keep
        return torch.zeros(rank, dtype=torch.float64), omega[:, :rank].clone()
    y_nu = y + nu * omega
    b = omega.T @ y_nu
    chol, info = torch.linalg.cholesky_ex((b + b.T) / 2)
    if int(info) == 0:
        e = torch.linalg.solve_triangular(chol, y_nu.T, upper=False).T  # Y_nu C^-T
    else:
        # B is PSD up to rounding but Cholesky failed: its pseudo-inverse square root gives the same Y B^+ Y^T
        d, q = torch.linalg.eigh((b + b.T) / 2)
        keep = d > d.max() * y.shape[1] * torch.finfo(torch.float64).eps
        e = y_nu @ (q[:, keep] / d[keep].sqrt())
    w, s, _ = torch.linalg.svd(e, full_matrices=False)
    lam = (s[:rank] ** 2 - nu).clamp_min(0.0)
    return lam, w[:, :rank]


def fit_blocks(layout: FactorLayout, row_blocks: Iterable[torch.Tensor], cfg: CurvatureConfig = CurvatureConfig(),
               device: torch.device | str = "cpu") -> tuple[list[CurvatureBlock], int]:
    """The curvature blocks of the factor rows streamed as ``row_blocks`` (each ``[m, width]``),
    one pass: ``(blocks, N)``. The arithmetic is float64 whatever the rows' dtype."""
    groups = layer_blocks(layout, cfg.scope)
    dims = [sum(layout.layers[i].dim for i in g) for g in groups]
    ranks = [min(cfg.rank, d) for d in dims]
    gen = torch.Generator().manual_seed(cfg.seed)
    omegas = [sketch_matrix(d, min(r + cfg.oversample, d), gen).to(device) for d, r in zip(dims, ranks)]
    sketches = [torch.zeros_like(o) for o in omegas]
    traces = [0.0] * len(groups)
    n = 0
    for rows in row_blocks:
        rows = rows.to(device=device, dtype=torch.float64)
        for b, layers in enumerate(groups):
            g = block_gradients(layout, rows, layers)
            sketches[b] += g.T @ (g @ omegas[b])  # sum_i g_i (g_i^T Omega)
            traces[b] += float((g * g).sum())
        n += len(rows)
    if n == 0:
        raise ValueError("no rows to fit a curvature on")
    blocks = []
    for layers, y, omega, r, tr in zip(groups, sketches, omegas, ranks, traces):
        lam, vec = nystrom(y.cpu() / n, omega.cpu(), r)
        blocks.append(CurvatureBlock(layers, lam, vec.T.contiguous(), tr / n))
    return blocks, n


def fit_curvature(store: Datastore, cfg: CurvatureConfig = CurvatureConfig(), progress: bool = True) -> Curvature:
    """Fit the curvature of one checkpoint's LoRIF pool store in one pass (module docstring)."""
    require_factor_stores([store], "fit-curvature")
    layout = store_layout(store)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    bar = progress_bar(total=store.n_rows, desc=f"curvature {store.checkpoint}", unit="row", enabled=progress)

    def rows():
        for _, block in factor_rows(store, cfg.block_rows, device, torch.float64):
            yield block
            bar.update(len(block))

    blocks, n = fit_blocks(layout, rows(), cfg, device)
    bar.close()
    if all(b.trace == 0.0 for b in blocks):
        raise StoreError(f"{store.path}: every stored factor is zero; there is no curvature to fit")
    meta = {
        "format": CURVATURE_FORMAT, "format_version": 1, "created_with": f"qless {__version__}",
        "method": "nystrom-streaming (Tropp, Yurtsever, Udell, Cevher 2017, Alg. 3)",
        "identity": {f: store.manifest.get(f) for f in IDENTITY_FIELDS},
        "fitted_on": {"store": str(store.path), "digest": content_digest(store), "gradient": store.manifest.get("gradient"),
                      "set": store.manifest.get("extra", {}).get("set")},
        "n": n, "rank": cfg.rank, "scope": cfg.scope, "oversample": cfg.oversample, "seed": cfg.seed,
        "damping": cfg.damping, "damping_rule": "lambda = damping x trace(A_b) / D_b (the block's mean eigenvalue)",
        "config": to_dict(cfg),
    }
    return Curvature(layout, blocks, meta)


# -- the artefact on disk ----------------------------------------------------------------------

FILES = ("curvature.json", "curvature.safetensors")


def write_curvature(folder: Path, curv: Curvature) -> None:
    """``curvature.json`` and ``curvature.safetensors`` of one checkpoint into ``folder`` (existing, empty)."""
    from safetensors.torch import save_file

    tensors = {}
    for b, block in enumerate(curv.blocks):
        tensors[f"block{b}.eigenvalues"] = block.eigenvalues.to(torch.float64).contiguous()
        tensors[f"block{b}.eigenvectors"] = block.eigenvectors.to(torch.float64).contiguous()
    save_file(tensors, str(folder / "curvature.safetensors"))
    blocks = [{"layers": [curv.layout.layers[i].name for i in blk.layers], "dim": blk.dim, "rank": len(blk.eigenvalues),
               "trace": blk.trace, "mean_eigenvalue": blk.mean_eigenvalue} for blk in curv.blocks]
    (folder / "curvature.json").write_text(dumps({**curv.meta, "blocks": blocks}))


def read_curvature(folder: str | Path) -> Curvature:
    """One checkpoint's curvature from its folder, checked: a damaged artefact is refused by name."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    fix = "fit it again with `qless fit-curvature`"
    meta = read_json(folder / "curvature.json", StoreError, fix) if (folder / "curvature.json").is_file() else None
    if not isinstance(meta, dict) or meta.get("format") != CURVATURE_FORMAT:
        raise StoreError(f"{folder}: not a LoRIF curvature (no curvature.json of format {CURVATURE_FORMAT}); {fix}")
    try:
        proj = meta["identity"]["projection"]
        layout = FactorLayout([tuple(x) for x in proj["layer_list"]], proj["rank"])
        names = {lay.name: i for i, lay in enumerate(layout.layers)}
        specs = [([names[n] for n in b["layers"]], float(b["trace"])) for b in meta["blocks"]]
        float(meta["damping"])
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{folder / 'curvature.json'}: missing or malformed field ({e}); {fix}") from None
    try:
        tensors = load_file(str(folder / "curvature.safetensors"))
    except (OSError, SafetensorError) as e:
        raise StoreError(f"{folder / 'curvature.safetensors'}: unreadable ({e}); {fix}") from None
    blocks = []
    for b, (layers, trace) in enumerate(specs):
        lam, vec = tensors.get(f"block{b}.eigenvalues"), tensors.get(f"block{b}.eigenvectors")
        dim = sum(layout.layers[i].dim for i in layers)
        if lam is None or vec is None or lam.dim() != 1 or tuple(vec.shape) != (len(lam), dim):
            raise StoreError(f"{folder / 'curvature.safetensors'}: block {b} is missing or not [r] and [r, {dim}]; {fix}")
        blocks.append(CurvatureBlock(layers, lam.to(torch.float64), vec.to(torch.float64), trace))
    return Curvature(layout, blocks, meta)


def check_curvature(curv: Curvature, store: Datastore, where: str) -> None:
    """Refuse a curvature fitted on another projection, checkpoint, model or adapter than ``store``'s."""
    require_same(curv.meta["identity"], store.manifest, IDENTITY_FIELDS, f"the curvature {where}",
                 f"store {store.path}", "Fit the curvature on the pool store of the same extraction "
                 "(`qless fit-curvature POOL_STORES --out DIR`).")


def read_curvatures(folder: str | Path) -> dict[str, Curvature]:
    """``checkpoint name -> Curvature`` of a folder written by :func:`fit_curvature_folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StoreError(f"{folder}: no such curvature folder; run `qless fit-curvature` first, or use --curvature none")
    out = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        curv = read_curvature(sub)
        if curv.checkpoint in out:
            raise StoreMismatchError(f"{folder}: two curvatures for checkpoint {curv.checkpoint!r}; keep one")
        out[curv.checkpoint] = curv
    if not out:
        raise StoreError(f"{folder}: holds no curvature; run `qless fit-curvature` into it")
    return out


def fit_curvature_folder(stores: Sequence[str | Path] | Sequence[Datastore], out: str | Path,
                         cfg: CurvatureConfig = CurvatureConfig(), *, replace: bool = False,
                         progress: bool = True) -> dict[str, Path]:
    """Fit one curvature per checkpoint of the LoRIF store(s) ``stores`` (folders, or opened stores)
    into the folder ``out`` (``OUT/<checkpoint>/``), all or nothing; returns checkpoint -> folder.
    ``replace=True`` swaps out an existing ``out``; otherwise it must be new."""
    from qless.store import open_by_checkpoint

    opened = list(stores) if all(isinstance(s, Datastore) for s in stores) else open_by_checkpoint(stores)
    require_factor_stores(opened, "fit-curvature")
    fits = [fit_curvature(s, cfg, progress=progress) for s in opened]
    out = Path(out)
    with atomic_folder(out, replace=replace, what="the curvature") as tmp:
        for curv in fits:
            sub = tmp / safe_name(curv.checkpoint, "checkpoint name")
            sub.mkdir()
            write_curvature(sub, curv)
    for curv in fits:
        log.info("curvature of %s: %d block(s), rank %d, N = %d", curv.checkpoint, len(curv.blocks), cfg.rank,
                 curv.meta["n"])
    return {c.checkpoint: out / c.checkpoint for c in fits}


def curvature_digest(folder: str | Path) -> str:
    """SHA-256 of a curvature folder's files (every checkpoint's metadata and tensors), naming what a
    LoRIF score used: a curvature fitted again into the same folder gets another digest."""
    folder = Path(folder)
    h = hashlib.sha256()
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for name in FILES:
            h.update(f"{sub.name}/{name}\n".encode())
            with open(sub / name, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest()


__all__ = [
    "Curvature",
    "CurvatureBlock",
    "CurvatureConfig",
    "block_gradients",
    "check_curvature",
    "curvature_digest",
    "fit_blocks",
    "fit_curvature",
    "fit_curvature_folder",
    "layer_blocks",
    "nystrom",
    "read_curvature",
    "read_curvatures",
    "sketch_matrix",
    "write_curvature",
]
