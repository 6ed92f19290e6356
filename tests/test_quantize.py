"""ResidualQuantizer (RQ-KMeans): fitting semantics, kinds, persistence, errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from recbase import ResidualQuantizer
from recbase.ops import kmeans, rq_encode


def _x(seed=0, n=1200, d=16):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((30, d)) * 2
    return (centers[rng.integers(0, 30, n)] + rng.standard_normal((n, d))).astype(np.float32)


@pytest.fixture(scope="module")
def fitted():
    x = _x()
    return x, ResidualQuantizer(3, 32, niter=8, seed=5, progress=False).fit(x)


def test_fit_is_kmeans_on_residuals(fitted):
    x, rq = fitted
    assert rq.codebooks.shape == (3, 32, 16) and rq.codebooks.dtype == np.float32
    # independent replay: level l = k-means(seed + l) on the residual left by levels < l
    r = x.astype(np.float32).copy()
    for lvl in range(3):
        cent, obj = kmeans(r, 32, niter=8, seed=5 + lvl)
        np.testing.assert_array_equal(rq.codebooks[lvl], cent)
        np.testing.assert_array_equal(rq.objective_[lvl], obj)
        r64 = r.astype(np.float64)
        c = ((r64[:, None] - cent[None].astype(np.float64)) ** 2).sum(-1).argmin(1)
        r = r - cent[c]


def test_max_train_points_fits_on_a_seeded_subsample(fitted):
    x, _ = fitted
    sub = ResidualQuantizer(2, 32, niter=4, seed=2, progress=False, max_train_points=500).fit(x)
    rows = np.sort(np.random.default_rng(2).choice(len(x), 500, replace=False))
    ref = ResidualQuantizer(2, 32, niter=4, seed=2, progress=False).fit(x[rows])
    np.testing.assert_array_equal(sub.codebooks, ref.codebooks)
    assert sub.encode(x).shape == (len(x), 2)
    with pytest.raises(ValueError, match="max_train_points: expected >= codebook_size"):
        ResidualQuantizer(2, 32, progress=False, max_train_points=10).fit(x)


def test_encode_decode_and_error_per_level(fitted):
    x, rq = fitted
    codes = rq.encode(x)
    assert codes.shape == (len(x), 3) and codes.dtype == np.int64
    np.testing.assert_array_equal(codes, rq_encode(x, rq.codebooks))
    x_hat = rq.decode(codes)
    assert x_hat.dtype == np.float32 and x_hat.shape == x.shape
    err = ((x.astype(np.float64) - x_hat) ** 2).sum(1).mean()
    var = ((x - x.mean(0)) ** 2).sum(1).mean()
    assert rq.reconstruction_error(x) == pytest.approx(err / var, rel=1e-6)
    assert rq.reconstruction_error(x, relative=False) == pytest.approx(err, rel=1e-6)
    # more levels -> lower error (each level's k-means objective is below the previous level's)
    finals = [o[-1] for o in rq.objective_]
    assert finals[0] > finals[1] > finals[2]
    np.testing.assert_allclose(finals[2] / len(x), err, rtol=1e-4)
    one = ResidualQuantizer(1, 32, niter=8, seed=5, progress=False).fit(x)
    assert rq.reconstruction_error(x) < one.reconstruction_error(x) < 1.0
    usage = rq.codebook_usage(x)
    assert usage.shape == (3,) and (usage > 0.5).all() and (usage <= 1).all()


def test_beam_encoding_lowers_error(fitted):
    x, rq = fitted
    e_greedy = ((x - rq.decode(rq.encode(x))) ** 2).sum()
    e_beam = ((x - rq.decode(rq.encode(x, beam_size=8))) ** 2).sum()
    assert e_beam < e_greedy
    rq8 = ResidualQuantizer(3, 32, beam_size=8)
    rq8._codebooks = rq.codebooks
    np.testing.assert_array_equal(rq8.encode(x), rq.encode(x, beam_size=8))


def test_same_kind_out(fitted):
    x, rq = fitted
    xt = torch.from_numpy(x)
    codes = rq.encode(xt)
    assert isinstance(codes, torch.Tensor) and codes.dtype == torch.long
    np.testing.assert_array_equal(codes.numpy(), rq.encode(x))
    assert isinstance(rq.decode(codes), torch.Tensor)
    assert isinstance(rq.decode(codes.numpy()), np.ndarray)
    rq_t = ResidualQuantizer(3, 32, niter=8, seed=5, progress=False).fit(xt)
    np.testing.assert_array_equal(rq_t.codebooks, rq.codebooks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_in_cuda_out(fitted):
    x, rq = fitted
    codes = rq.encode(torch.from_numpy(x).cuda())
    assert codes.is_cuda
    assert (codes.cpu().numpy() == rq.encode(x)).all(1).mean() > 0.99
    assert rq.decode(codes).is_cuda


def test_save_load_round_trip(tmp_path, fitted):
    x, rq = fitted
    path = tmp_path / "rq.safetensors"
    rq.save(path)
    rq.save(path)  # overwrite works
    back = ResidualQuantizer.load(path)
    assert back.config() == rq.config()
    np.testing.assert_array_equal(back.codebooks, rq.codebooks)
    assert back.codebooks.tobytes() == rq.codebooks.tobytes()
    np.testing.assert_array_equal(back.encode(x), rq.encode(x))
    assert sorted(os.listdir(tmp_path)) == ["rq.safetensors"]  # no temp files left


def test_save_is_atomic(tmp_path, fitted, monkeypatch):
    _, rq = fitted
    path = tmp_path / "rq.safetensors"
    rq.save(path)
    before = path.read_bytes()
    import safetensors.numpy

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        rq.save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["rq.safetensors"]


def test_load_rejects_bad_files(tmp_path, fitted):
    from safetensors.numpy import save_file

    _, rq = fitted
    with pytest.raises(FileNotFoundError, match="no quantizer file"):
        ResidualQuantizer.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        ResidualQuantizer.load(junk)
    good = tmp_path / "good.safetensors"
    rq.save(good)
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        ResidualQuantizer.load(truncated)
    nometa = tmp_path / "nometa.safetensors"
    save_file({"codebooks": rq.codebooks}, str(nometa))
    with pytest.raises(ValueError, match="no valid recbase quantizer metadata"):
        ResidualQuantizer.load(nometa)
    cfg = rq.config()
    wrong = tmp_path / "wrong.safetensors"
    save_file({"codebooks": rq.codebooks[:2]}, str(wrong), metadata={"recbase": json.dumps(cfg)})
    with pytest.raises(ValueError, match="do not match the config"):
        ResidualQuantizer.load(wrong)
    save_file({"codebooks": rq.codebooks.astype(np.float64)}, str(wrong),
              metadata={"recbase": json.dumps(cfg)})
    with pytest.raises(ValueError, match="do not match the config"):
        ResidualQuantizer.load(wrong)
    nan = rq.codebooks.copy()
    nan[0, 0, 0] = np.nan
    save_file({"codebooks": nan}, str(wrong), metadata={"recbase": json.dumps(cfg)})
    with pytest.raises(ValueError, match="NaN or Inf"):
        ResidualQuantizer.load(wrong)
    save_file({"codebooks": rq.codebooks}, str(wrong),
              metadata={"recbase": json.dumps({**cfg, "version": 99})})
    with pytest.raises(ValueError, match="unsupported format version"):
        ResidualQuantizer.load(wrong)
    save_file({"codebooks": rq.codebooks}, str(wrong), metadata={"recbase": json.dumps({"a": 1})})
    with pytest.raises(ValueError, match="is not a recbase.ResidualQuantizer file"):
        ResidualQuantizer.load(wrong)


def test_bad_arguments(fitted):
    x, rq = fitted
    with pytest.raises(ValueError, match="levels: expected >= 1"):
        ResidualQuantizer(0, 8)
    with pytest.raises(ValueError, match="method: expected 'kmeans' or 'vae'"):
        ResidualQuantizer(2, 8, method="pq")
    with pytest.raises(TypeError, match="codebook_size: expected an int"):
        ResidualQuantizer(2, "8")
    with pytest.raises(RuntimeError, match="not fitted"):
        ResidualQuantizer(2, 8).encode(x)
    with pytest.raises(ValueError, match="fewer vectors than codewords"):
        ResidualQuantizer(2, 64, progress=False).fit(x[:10])
    with pytest.raises(ValueError, match=r"x: expected shape \(N, 16\)"):
        rq.encode(x[:, :4])
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        ResidualQuantizer(2, 8).fit(x.astype(np.int64))
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="x: contains NaN or Inf"):
        ResidualQuantizer(2, 8, progress=False).fit(bad)
    with pytest.raises(ValueError, match=r"codes: expected values in \[0, 32\)"):
        rq.decode(np.full((2, 3), 32))


def test_progress_bar(capsys):
    x = _x(n=300, d=4)
    ResidualQuantizer(2, 8, niter=2).fit(x)
    assert "RQ-KMeans" in capsys.readouterr().err
    ResidualQuantizer(2, 8, niter=2, progress=False).fit(x)
    assert "RQ-KMeans" not in capsys.readouterr().err


def test_vae_method_delegates(tmp_path):
    x = _x(n=400, d=8)
    rq = ResidualQuantizer(2, 8, method="vae", progress=False,
                           vae_config={"latent_dim": 4, "hidden_dims": [16], "epochs": 2})
    try:
        import recbase.rqvae  # noqa: F401
    except ImportError:
        with pytest.raises(NotImplementedError, match="CurriculumRQVAE"):
            rq.fit(x)
        return
    codes = rq.fit(x).encode(x)
    assert codes.shape == (400, 2) and codes.dtype == np.int64
    assert rq.codebooks.shape == (2, 8, 4)
    assert rq.decode(codes).shape == x.shape
    rq.save(tmp_path / "vae.safetensors")
    back = ResidualQuantizer.load(tmp_path / "vae.safetensors")
    np.testing.assert_array_equal(back.encode(x), codes)
    np.testing.assert_array_equal(back.decode(codes), rq.decode(codes))
