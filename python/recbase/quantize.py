"""ResidualQuantizer: hierarchical concept IDs by residual quantization (RQ-KMeans or RQ-VAE).

    r_0 = x;  c_l = argmin_k ||r_l - e_{l,k}||^2;  r_{l+1} = r_l - e_{l,c_l};  x_hat = sum_l e_{l,c_l}

``method="kmeans"`` (RQ-KMeans): level l's codebook is k-means on the residuals r_l left by the
levels before it. Encoding/decoding run on the C++ engine (CPU) or the fused CUDA kernel
through :mod:`recbase.ops.rq`. ``method="vae"`` delegates to the curriculum RQ-VAE
(:class:`recbase.rqvae.CurriculumRQVAE`).

>>> import numpy as np
>>> from recbase import ResidualQuantizer
>>> x = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
>>> rq = ResidualQuantizer(levels=2, codebook_size=32, niter=10, progress=False).fit(x)
>>> codes = rq.encode(x)
>>> codes.shape, codes.dtype
((2000, 2), dtype('int64'))
>>> bool(rq.reconstruction_error(x) < 1.0)
True
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from recbase._atomic import atomic_file
from recbase.ops import rq as _ops

__all__ = ["ResidualQuantizer"]

_FORMAT = "recbase.ResidualQuantizer"
_FORMAT_VERSION = 1


def _to_numpy_f32(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
        return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(f"{name}: expected a floating-point array, got dtype {x.dtype}")
        return np.ascontiguousarray(x, dtype=np.float32)
    raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")


class ResidualQuantizer:
    """Residual quantizer with ``levels`` codebooks of ``codebook_size`` codewords each.

    Args:
        levels: number of code levels L (>= 1).
        codebook_size: codewords per level K (>= 1; concept IDs use the same K at every level).
        method: ``"kmeans"`` (RQ-KMeans, default) or ``"vae"`` (curriculum RQ-VAE).
        seed: seed of the k-means++ initialisation (level l uses ``seed + l``).
        niter: Lloyd iterations per level.
        beam_size: encoding beam (1 = greedy, the fast path; > 1 lowers the error slightly).
        threads: CPU threads (0 = all).
        progress: show a tqdm bar over levels while fitting.
        max_train_points: fit on at most this many rows, a seeded random subsample (None = all
            rows; e.g. 256 * codebook_size, as FAISS does, bounds the cost on huge catalogs).
        vae_config: extra :class:`recbase.rqvae.RQVAEConfig` fields for ``method="vae"``.

    Inputs may be numpy arrays or torch tensors (CPU or CUDA); outputs are of the same kind
    (and device). ``fit`` always trains on the CPU with the C++ engine (deterministic for a
    seed); ``encode``/``decode`` run where the input lives (CUDA: fused kernel). After ``fit``: ``codebooks`` (L, K, d) float32 numpy and ``objective_`` (per
    level, the k-means objective history).
    """

    def __init__(
        self,
        levels: int,
        codebook_size: int,
        method: str = "kmeans",
        seed: int = 0,
        niter: int = 25,
        beam_size: int = 1,
        threads: int = 0,
        progress: bool = True,
        vae_config: dict | None = None,
        max_train_points: int | None = None,
    ):
        self.levels = _ops._check_int(levels, "levels", 1)
        self.codebook_size = _ops._check_int(codebook_size, "codebook_size", 1)
        if method not in ("kmeans", "vae"):
            raise ValueError(f"method: expected 'kmeans' or 'vae', got {method!r}")
        self.method = method
        self.seed = _ops._check_int(seed, "seed", 0)
        self.niter = _ops._check_int(niter, "niter", 0, _ops.MAX_KMEANS_ITERS)
        self.beam_size = _ops._check_int(beam_size, "beam_size", 1)
        self.threads = _ops._check_threads(threads)
        self.progress = bool(progress)
        self.vae_config = dict(vae_config or {})
        self.max_train_points = (None if max_train_points is None
                                 else _ops._check_int(max_train_points, "max_train_points", 1))
        self._codebooks: np.ndarray | None = None
        self._vae = None
        self.objective_: list[np.ndarray] = []

    # -- state -------------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return self._codebooks is not None

    @property
    def dim(self) -> int:
        """Input dimension d (after fit)."""
        self._check_fitted()
        return int(self._vae.config.input_dim if self._vae is not None else self._codebooks.shape[2])

    @property
    def codebooks(self) -> np.ndarray:
        """(levels, K, d) float32 codebooks (for ``method="vae"``: the latent codebooks)."""
        self._check_fitted()
        return self._codebooks

    def _check_fitted(self) -> None:
        if self._codebooks is None:
            raise RuntimeError("ResidualQuantizer is not fitted: call fit(x) or load(path) first")

    def __repr__(self) -> str:
        state = f"d={self.dim}" if self.is_fitted else "unfitted"
        return (f"ResidualQuantizer(levels={self.levels}, codebook_size={self.codebook_size}, "
                f"method={self.method!r}, {state})")

    # -- fitting -----------------------------------------------------------------------------
    def fit(self, x, progress: bool | None = None) -> "ResidualQuantizer":
        """Train the codebooks on x (N, d) with N >= codebook_size; returns self."""
        progress = self.progress if progress is None else bool(progress)
        if self.method == "vae":
            return self._fit_vae(x, progress)
        xn = _to_numpy_f32(x, "x")
        if xn.ndim != 2 or xn.shape[1] < 1:
            raise ValueError(f"x: expected a 2-d array (N, d) with d >= 1, got shape {xn.shape}")
        K = self.codebook_size
        if xn.shape[0] < K:
            raise ValueError(
                f"x: fewer vectors than codewords: need at least codebook_size={K} rows, got "
                f"{xn.shape[0]}"
            )
        if not np.isfinite(xn).all():
            raise ValueError("x: contains NaN or Inf values")
        m = self.max_train_points
        if m is not None and m < xn.shape[0]:
            if m < K:
                raise ValueError(f"max_train_points: expected >= codebook_size={K}, got {m}")
            rows = np.sort(np.random.default_rng(self.seed).choice(xn.shape[0], m, replace=False))
            xn = xn[rows]
        from tqdm.auto import tqdm

        residual = xn.copy()
        codebooks = np.empty((self.levels, K, xn.shape[1]), dtype=np.float32)
        self.objective_ = []
        for lvl in tqdm(range(self.levels), desc="RQ-KMeans", disable=not progress):
            cent, obj = _ops.kmeans(residual, K, niter=self.niter, seed=self.seed + lvl,
                                    threads=self.threads)
            codebooks[lvl] = cent
            self.objective_.append(obj)
            if lvl + 1 < self.levels:
                c = _ops.rq_encode(residual, cent[None], threads=self.threads)[:, 0]
                residual -= cent[c]
        self._codebooks = codebooks
        return self

    def _fit_vae(self, x, progress: bool) -> "ResidualQuantizer":
        try:
            from recbase.rqvae import CurriculumRQVAE, RQVAEConfig
        except ImportError as exc:  # pragma: no cover - depends on the installed package
            raise NotImplementedError("method='vae' needs recbase.rqvae.CurriculumRQVAE") from exc
        xt = torch.as_tensor(_to_numpy_f32(x, "x"))
        if xt.ndim != 2:
            raise ValueError(f"x: expected a 2-d array (N, d), got shape {tuple(xt.shape)}")
        cfg = RQVAEConfig(input_dim=int(xt.shape[1]), levels=self.levels,
                          codebook_size=self.codebook_size, seed=self.seed, **self.vae_config)
        self._vae = CurriculumRQVAE(cfg).fit(xt, progress=progress)
        self._codebooks = self._vae.codebooks.detach().to(torch.float32).numpy().copy()
        return self

    # -- encoding / decoding -----------------------------------------------------------------
    def encode(self, x, beam_size: int | None = None):
        """int64 codes (N, levels); numpy in -> numpy out, tensor in -> tensor on its device."""
        self._check_fitted()
        beam = self.beam_size if beam_size is None else _ops._check_int(beam_size, "beam_size", 1)
        if self._vae is not None:
            return self._vae_call(x, "x", self._vae.encode)
        xt, was_numpy = _ops._as_tensor(x, "x")
        if xt.dim() != 2 or xt.shape[1] != self.dim:
            raise ValueError(f"x: expected shape (N, {self.dim}), got {tuple(xt.shape)}")
        codes = _ops.rq_encode(xt, self._codebooks_on(xt.device), beam_size=beam,
                               threads=self.threads)
        return codes.numpy() if was_numpy else codes

    def decode(self, codes):
        """Reconstruction (N, d) float32 of int64 codes (N, levels)."""
        self._check_fitted()
        if self._vae is not None:
            return self._vae_call(codes, "codes", self._vae.decode)
        ct, was_numpy = _ops._as_tensor(codes, "codes")
        out = _ops.rq_decode(ct, self._codebooks_on(ct.device), threads=self.threads)
        return out.numpy() if was_numpy else out

    def reconstruction_error(self, x, relative: bool = True) -> float:
        """Mean squared error ||x - decode(encode(x))||^2 per vector (float64); divided by the
        mean ||x - mean(x)||^2 when ``relative`` (1.0 = no better than predicting the mean)."""
        xn = _to_numpy_f32(x, "x").astype(np.float64)
        x_hat = np.asarray(self.decode(self.encode(_to_numpy_f32(x, "x"))), dtype=np.float64)
        err = float(((xn - x_hat) ** 2).sum(1).mean())
        if relative:
            var = float(((xn - xn.mean(0)) ** 2).sum(1).mean())
            return err / var if var > 0 else (0.0 if err == 0 else float("inf"))
        return err

    def codebook_usage(self, x) -> np.ndarray:
        """(levels,) fraction of each level's codewords used by encode(x) (1.0 = no dead codes)."""
        codes = np.asarray(torch.as_tensor(self.encode(_to_numpy_f32(x, "x"))).cpu())
        return np.array([len(np.unique(codes[:, lvl])) / self.codebook_size
                         for lvl in range(self.levels)])

    def _codebooks_on(self, device: torch.device) -> torch.Tensor:
        cb = torch.from_numpy(self._codebooks)
        return cb if device.type == "cpu" else cb.to(device)

    def _vae_call(self, a, name, fn):
        t, was_numpy = _ops._as_tensor(a, name)
        out = fn(t.cpu()).to(t.device)
        return out.numpy() if was_numpy else out

    # -- persistence -------------------------------------------------------------------------
    def config(self) -> dict:
        return {
            "format": _FORMAT, "version": _FORMAT_VERSION, "levels": self.levels,
            "codebook_size": self.codebook_size, "method": self.method, "seed": self.seed,
            "niter": self.niter, "beam_size": self.beam_size, "threads": self.threads,
            "vae_config": self.vae_config, "max_train_points": self.max_train_points,
        }

    def save(self, path) -> None:
        """Write codebooks (safetensors) with the JSON config in its metadata; atomic (a temp file
        in the same folder is renamed over ``path``)."""
        from safetensors.numpy import save_file

        self._check_fitted()
        path = Path(path)
        tensors = {"codebooks": np.ascontiguousarray(self._codebooks)}
        meta = {"recbase": json.dumps(self.config())}
        if self._vae is not None:
            for name, value in self._vae.state_dict().items():
                tensors[f"vae.{name}"] = value.detach().cpu().contiguous().numpy()
            meta["vae_config"] = json.dumps(self._vae.config_dict())
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path) -> "ResidualQuantizer":
        """Read a quantizer written by :meth:`save`; raises ValueError for corrupt or
        inconsistent files and FileNotFoundError for missing ones."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path: no quantizer file at {path}")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise ValueError(f"path: {path} is not a readable safetensors file ({exc})") from exc
        try:
            cfg = json.loads(meta["recbase"])
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"path: {path} has no valid recbase quantizer metadata") from exc
        if not isinstance(cfg, dict) or cfg.get("format") != _FORMAT:
            raise ValueError(f"path: {path} is not a {_FORMAT} file")
        if cfg.get("version") != _FORMAT_VERSION:
            raise ValueError(f"path: unsupported format version {cfg.get('version')!r} in {path}")
        cb = tensors.get("codebooks")
        L, K = cfg.get("levels"), cfg.get("codebook_size")
        if cb is None or cb.dtype != np.float32 or cb.ndim != 3 or cb.shape[:2] != (L, K):
            raise ValueError(
                f"path: codebooks in {path} do not match the config: expected float32 "
                f"({L}, {K}, d), got {None if cb is None else (cb.dtype, cb.shape)}"
            )
        if not np.isfinite(cb).all():
            raise ValueError(f"path: codebooks in {path} contain NaN or Inf values")
        rq = cls(L, K, method=cfg["method"], seed=cfg["seed"], niter=cfg["niter"],
                 beam_size=cfg["beam_size"], threads=cfg["threads"], progress=False,
                 vae_config=cfg.get("vae_config"), max_train_points=cfg.get("max_train_points"))
        rq._codebooks = np.ascontiguousarray(cb)
        if rq.method == "vae":
            from recbase.rqvae import CurriculumRQVAE

            state = {k[4:]: torch.from_numpy(v.copy()) for k, v in tensors.items()
                     if k.startswith("vae.")}
            try:
                rq._vae = CurriculumRQVAE.from_state(json.loads(meta["vae_config"]), state)
            except Exception as exc:
                raise ValueError(f"path: RQ-VAE state in {path} is invalid ({exc})") from exc
        return rq
