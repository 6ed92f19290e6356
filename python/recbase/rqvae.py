"""The paper's item tokenizer: a residual-quantized VAE trained with a level curriculum.

    z = enc(x);  c_l = argmin_k ||r_l - e_{l,k}||,  r_{l+1} = r_l - e_{l,c_l},  r_0 = z
    x_hat = dec(sum_l e_{l,c_l})
    loss = ||x - x_hat||^2 + sum_l ||sg(r_l) - e_{l,c_l}||^2 + beta * ||r_l - sg(e_{l,c_l})||^2

Curriculum (RecBase's "CL-VAE"): training is split into ``levels`` phases; phase p trains with
levels 0..p switched on. Each level's codebook is initialised by k-means on the residuals it
will quantize when it is switched on, and codes unused during an epoch are re-seeded from
random residuals (dead-code re-initialisation). Code assignment uses the fast encode op
(``recbase.ops.rq_encode``); gradients flow to the encoder through a straight-through estimator.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class RQVAEConfig:
    input_dim: int
    levels: int = 3
    codebook_size: int = 256
    latent_dim: int = 64
    hidden_dims: list[int] = field(default_factory=lambda: [512, 256])
    beta: float = 0.25
    epochs: int = 40
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    kmeans_iters: int = 20
    seed: int = 0


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class CurriculumRQVAE(nn.Module):
    """Curriculum RQ-VAE. Use it through ``ResidualQuantizer(method="vae")`` or directly:

    >>> import torch
    >>> from recbase.rqvae import CurriculumRQVAE, RQVAEConfig
    >>> x = torch.randn(512, 32)
    >>> vae = CurriculumRQVAE(RQVAEConfig(input_dim=32, levels=2, codebook_size=16,
    ...                                   latent_dim=8, hidden_dims=[32], epochs=4))
    >>> codes = vae.fit(x, progress=False).encode(x)
    >>> tuple(codes.shape)
    (512, 2)
    """

    def __init__(self, config: RQVAEConfig):
        super().__init__()
        if config.levels < 1 or config.codebook_size < 2:
            raise ValueError(
                f"levels must be >= 1 and codebook_size >= 2, got levels={config.levels}, "
                f"codebook_size={config.codebook_size}"
            )
        self.config = config
        dims = [config.input_dim, *config.hidden_dims, config.latent_dim]
        with torch.random.fork_rng(devices=[]):  # seeded weights without touching global RNG
            torch.manual_seed(config.seed)
            self.encoder = _mlp(dims)
            self.decoder = _mlp(dims[::-1])
        self.codebooks = nn.Parameter(
            torch.zeros(config.levels, config.codebook_size, config.latent_dim)
        )
        self.active_levels = config.levels  # all levels are on after training
        # Shift and scale of the inputs, fitted with the model, so the MLP sees unit-scale data.
        self.register_buffer("mean", torch.zeros(config.input_dim))
        self.register_buffer("scale", torch.ones(()))

    # -- quantization ---------------------------------------------------------------------------
    def _assign(self, z: torch.Tensor, levels: int) -> torch.Tensor:
        from recbase.ops import rq_encode

        cb = self.codebooks[:levels].detach().float().contiguous()
        return rq_encode(z.detach().float().contiguous(), cb)

    def _quantize(self, z: torch.Tensor, levels: int):
        codes = self._assign(z, levels)
        residual = z
        z_q = torch.zeros_like(z)
        cb_loss = z.new_zeros(())
        commit_loss = z.new_zeros(())
        for lvl in range(levels):
            e = self.codebooks[lvl][codes[:, lvl]]
            cb_loss = cb_loss + (residual.detach() - e).pow(2).sum(-1).mean()
            commit_loss = commit_loss + (residual - e.detach()).pow(2).sum(-1).mean()
            z_q = z_q + e
            residual = residual - e.detach()
        # straight-through: forward uses z_q, gradient to the encoder as if identity
        z_st = z + (z_q - z).detach()
        return z_st, codes, cb_loss, commit_loss

    @torch.no_grad()
    def _init_level(self, z: torch.Tensor, level: int) -> None:
        from recbase.ops import kmeans

        residual = z.float().clone()
        if level > 0:
            codes = self._assign(z, level)
            for lvl in range(level):
                residual -= self.codebooks[lvl][codes[:, lvl]]
        k = self.config.codebook_size
        if residual.shape[0] < k:
            raise ValueError(
                f"x: need at least codebook_size={k} vectors to initialise a codebook, "
                f"got {residual.shape[0]}"
            )
        centroids = kmeans(residual.contiguous(), k, niter=self.config.kmeans_iters,
                           seed=self.config.seed + level)[0]
        self.codebooks[level].copy_(torch.as_tensor(centroids, dtype=torch.float32))

    @torch.no_grad()
    def _reseed_dead(self, z: torch.Tensor, levels: int, usage: torch.Tensor, gen) -> int:
        """Re-seed codewords unused this epoch with random residuals of their level."""
        codes = self._assign(z, levels)
        residual = z.float().clone()
        reseeded = 0
        for lvl in range(levels):
            dead = torch.nonzero(usage[lvl] == 0).flatten()
            if len(dead):
                pick = torch.randint(0, z.shape[0], (len(dead),), generator=gen)
                self.codebooks[lvl][dead] = residual[pick]
                reseeded += len(dead)
            residual -= self.codebooks[lvl][codes[:, lvl]]
        return reseeded

    # -- training -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, levels: int | None = None):
        levels = self.active_levels if levels is None else levels
        z = self.encoder((x - self.mean) / self.scale)
        z_st, codes, cb_loss, commit_loss = self._quantize(z, levels)
        x_hat = self.decoder(z_st)
        recon = (x_hat - (x - self.mean) / self.scale).pow(2).sum(-1).mean()
        loss = recon + cb_loss + self.config.beta * commit_loss
        return loss, {"recon": recon.item(), "codebook": cb_loss.item(),
                      "commit": commit_loss.item()}, codes

    def fit(self, x: torch.Tensor, progress: bool = True) -> "CurriculumRQVAE":
        cfg = self.config
        x = torch.as_tensor(x, dtype=torch.float32)
        if x.ndim != 2 or x.shape[1] != cfg.input_dim:
            raise ValueError(f"x: expected shape (N, {cfg.input_dim}), got {tuple(x.shape)}")
        if x.shape[0] < cfg.codebook_size:
            raise ValueError(
                f"x: fewer vectors ({x.shape[0]}) than codewords (codebook_size={cfg.codebook_size})"
            )
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        self.mean.copy_(x.mean(0))
        self.scale.fill_(float((x - self.mean).pow(2).sum(-1).mean().sqrt()) + 1e-12)
        opt = torch.optim.AdamW(self.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        # Epochs per curriculum phase: the last phase (all levels) gets the remainder.
        per_phase = max(1, cfg.epochs // cfg.levels)
        phase_start = [p * per_phase for p in range(cfg.levels)]
        self.history: list[dict] = []
        bar = tqdm(range(cfg.epochs), desc="RQ-VAE", disable=not progress)
        levels = 0
        for epoch in bar:
            while levels < cfg.levels and epoch >= phase_start[levels]:
                with torch.no_grad():
                    z_all = self.encoder((x - self.mean) / self.scale)
                self._init_level(z_all, levels)
                levels += 1
            self.active_levels = levels
            usage = torch.zeros(cfg.levels, cfg.codebook_size)
            perm = torch.randperm(x.shape[0], generator=gen)
            totals = {"loss": 0.0, "recon": 0.0}
            for i in range(0, x.shape[0], cfg.batch_size):
                xb = x[perm[i:i + cfg.batch_size]]
                loss, parts, codes = self(xb, levels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for lvl in range(levels):
                    usage[lvl] += torch.bincount(codes[:, lvl], minlength=cfg.codebook_size)
                totals["loss"] += loss.item() * len(xb)
                totals["recon"] += parts["recon"] * len(xb)
            with torch.no_grad():
                z_all = self.encoder((x - self.mean) / self.scale)
                reseeded = self._reseed_dead(z_all, levels, usage, gen) if epoch < cfg.epochs - 1 else 0
            stats = {k: v / x.shape[0] for k, v in totals.items()}
            stats.update(epoch=epoch, levels=levels, reseeded=reseeded)
            self.history.append(stats)
            bar.set_postfix(levels=levels, loss=f"{stats['loss']:.4f}", recon=f"{stats['recon']:.4f}")
        self.active_levels = cfg.levels
        return self

    # -- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float32)
        z = self.encoder((x - self.mean) / self.scale)
        return self._assign(z, self.config.levels)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        codes = torch.as_tensor(codes, dtype=torch.long)
        z_q = sum(self.codebooks[lvl][codes[:, lvl]] for lvl in range(codes.shape[1]))
        return self.decoder(z_q) * self.scale + self.mean

    def config_dict(self) -> dict:
        return asdict(self.config)

    @classmethod
    def from_state(cls, config: dict, state: dict[str, torch.Tensor]) -> "CurriculumRQVAE":
        """Rebuild a saved model. The config is checked against the saved tensors' shapes before
        anything is allocated, so a crafted config cannot ask for more memory than the file holds."""
        if not isinstance(config, dict):
            raise ValueError(f"rqvae config: expected an object, got {type(config).__name__}")
        known = {f.name for f in fields(RQVAEConfig)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"rqvae config: unknown keys {unknown}")
        for key in ("input_dim", "levels", "codebook_size", "latent_dim", "epochs", "batch_size",
                    "kmeans_iters", "seed"):
            value = config.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"rqvae config: {key} expected a non-negative int, got {value!r}")
        hidden = config.get("hidden_dims", [])
        if not isinstance(hidden, list) or not all(
                isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden):
            raise ValueError(f"rqvae config: hidden_dims expected a list of positive ints, got {hidden!r}")
        cfg = RQVAEConfig(**config)
        expected = _state_shapes(cfg)
        given = {k: tuple(v.shape) for k, v in state.items()}
        if given != expected:
            missing = sorted(set(expected) - set(given))
            extra = sorted(set(given) - set(expected))
            wrong = sorted(k for k in set(expected) & set(given) if expected[k] != given[k])
            raise ValueError(
                "rqvae state does not match its config: "
                + "; ".join(part for part in (
                    f"missing {missing}" if missing else "",
                    f"unexpected {extra}" if extra else "",
                    ", ".join(f"{k} is {given[k]}, config says {expected[k]}" for k in wrong[:3]),
                ) if part)
            )
        model = cls(cfg)
        model.load_state_dict(state)
        return model


def _state_shapes(cfg: RQVAEConfig) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a model of this config saves, computed without building it."""
    dims = [cfg.input_dim, *cfg.hidden_dims, cfg.latent_dim]
    shapes: dict[str, tuple[int, ...]] = {}
    for name, seq in (("encoder", dims), ("decoder", dims[::-1])):
        for i in range(len(seq) - 1):  # Linear layers sit at even Sequential indices (SiLU between)
            shapes[f"{name}.{2 * i}.weight"] = (seq[i + 1], seq[i])
            shapes[f"{name}.{2 * i}.bias"] = (seq[i + 1],)
    shapes["codebooks"] = (cfg.levels, cfg.codebook_size, cfg.latent_dim)
    shapes["mean"] = (cfg.input_dim,)
    shapes["scale"] = ()
    return shapes

