"""Curriculum RQ-VAE: trains on CPU, switches levels on in order, beats a single-level quantizer."""
import numpy as np
import torch

from recbase.rqvae import CurriculumRQVAE, RQVAEConfig


def test_curriculum_rqvae_beats_single_level_quantizer():
    rng = np.random.default_rng(0)
    # data on a low-dimensional manifold in 32-d: what an autoencoder can exploit
    z = rng.normal(size=(3000, 6))
    w = rng.normal(size=(6, 32))
    x = torch.as_tensor(np.tanh(z @ w) + 0.01 * rng.normal(size=(3000, 32)), dtype=torch.float32)
    cfg = RQVAEConfig(input_dim=32, levels=3, codebook_size=32, latent_dim=8, hidden_dims=[64],
                      epochs=30, batch_size=256, lr=3e-3, seed=0)
    vae = CurriculumRQVAE(cfg).fit(x, progress=False)
    # the curriculum switched levels on one after another
    assert [h["levels"] for h in vae.history][:1] == [1]
    assert vae.history[-1]["levels"] == 3
    assert sorted({h["levels"] for h in vae.history}) == [1, 2, 3]
    codes = vae.encode(x)
    assert codes.shape == (3000, 3) and codes.dtype == torch.long
    err_vae = float((vae.decode(codes).double() - x.double()).pow(2).sum())
    # single-level quantizer with the same codebook size: plain k-means on x (float64 Lloyd)
    from recbase.ops import kmeans
    cent = torch.as_tensor(kmeans(x, 32, niter=25, seed=0)[0], dtype=torch.float64)
    err_km = float(torch.cdist(x.double(), cent).pow(2).min(1).values.sum())
    assert err_vae < err_km
    # training loss fell
    assert vae.history[-1]["recon"] < vae.history[0]["recon"]


def test_rqvae_is_seeded():
    x = torch.randn(600, 16, generator=torch.Generator().manual_seed(1))
    cfg = RQVAEConfig(input_dim=16, levels=2, codebook_size=16, latent_dim=4, hidden_dims=[16],
                      epochs=4, batch_size=128, seed=3)
    a = CurriculumRQVAE(cfg).fit(x, progress=False).encode(x)
    b = CurriculumRQVAE(cfg).fit(x, progress=False).encode(x)
    assert torch.equal(a, b)


def test_from_state_checks_the_config_against_the_tensors_before_allocating():
    import pytest

    cfg = RQVAEConfig(input_dim=12, levels=2, codebook_size=4, latent_dim=3, hidden_dims=[8, 5])
    model = CurriculumRQVAE(cfg)
    state = model.state_dict()
    again = CurriculumRQVAE.from_state(model.config_dict(), state)
    for k, v in state.items():
        assert torch.equal(again.state_dict()[k], v)
    # a crafted config asking for a billion codewords is refused from the saved shapes, not built
    for change, msg in (({"codebook_size": 10**9}, "codebooks is"),
                        ({"hidden_dims": [10**8]}, "does not match its config: unexpected"),
                        ({"levels": -1}, "levels expected a non-negative int"),
                        ({"hidden_dims": "8"}, "hidden_dims expected a list"),
                        ({"evil": 1}, "unknown keys")):
        with pytest.raises(ValueError, match=msg):
            CurriculumRQVAE.from_state({**model.config_dict(), **change}, state)
    with pytest.raises(ValueError, match="unexpected"):
        CurriculumRQVAE.from_state(model.config_dict(), {**state, "x": torch.zeros(1)})
