"""LoRA fine-tuning (recbase.finetune): only adapters train, analytic size, merge, save/load, errors."""
import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("peft")

from recbase.finetune import DEFAULT_TARGET_MODULES, load_lora, lora_model, merge_lora, save_lora  # noqa: E402
from recbase.model import RecBaseForCausalLM  # noqa: E402
from recbase.train import Trainer, TrainConfig  # noqa: E402
from test_train import L, K, synthetic_sequences, tiny_model  # noqa: E402

torch.set_num_threads(1)


def random_batch(gen: torch.Generator, batch=3, max_items=6):
    """Padded [B, T] batch of BOS + random items (random lengths, right padding) + its mask."""
    n_items = torch.randint(1, max_items + 1, (batch,), generator=gen)
    t = 1 + int(n_items.max()) * L
    ids = torch.zeros(batch, t, dtype=torch.long)
    for b, n in enumerate(n_items.tolist()):
        codes = torch.randint(0, K, (n, L), generator=gen)
        ids[b, 0] = 1
        ids[b, 1:1 + n * L] = (4 + torch.arange(L) * K + codes).reshape(-1)
    return ids, ids != 0


def randomize_adapters(model, gen: torch.Generator):
    """LoRA B starts at zero (adapted == base); give every adapter random weights so tests see them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def test_only_lora_parameters_train_and_base_weights_stay_bit_identical():
    base = tiny_model(seed=1)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = lora_model(base)
    cfg = TrainConfig(epochs=1, tokens_per_batch=512, lr=1e-2, warmup_steps=1, seed=0, progress=False)
    trainer = Trainer(model, synthetic_sequences(40, seed=5), [], cfg)
    optimized = {id(p) for g in trainer.opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert optimized == trainable
    lora_start = {n: p.detach().clone() for n, p in base.named_parameters() if "lora_" in n}
    for step in range(3):
        trainer.train_step(np.arange(step * 10, step * 10 + 10))
    seen = set()
    for name, p in base.named_parameters():
        if "lora_" in name:
            assert p.requires_grad
            assert not torch.equal(p, lora_start[name]), f"adapter {name} did not move"
        else:
            original = name.replace(".base_layer", "")  # peft nests the wrapped Linear
            assert not p.requires_grad
            assert torch.equal(p, before[original]), f"base weight {original} changed"
            seen.add(original)
    assert seen == set(before)  # every base weight was checked


@pytest.mark.parametrize("rank,targets", [(8, None), (3, ["q_proj", "v_proj"]), (1, ["down_proj", "o_proj"])])
def test_trainable_parameter_count_is_rank_times_in_plus_out(rank, targets):
    base = tiny_model()
    names = set(DEFAULT_TARGET_MODULES if targets is None else targets)
    expected = sum(rank * (m.in_features + m.out_features) for n, m in base.named_modules()
                   if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in names)
    per_layer = len(names)
    assert sum(isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in names
               for n, m in base.named_modules()) == per_layer * base.config.num_hidden_layers
    model = lora_model(base, rank=rank, target_modules=targets)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_merged_model_equals_adapted_model():
    gen = torch.Generator().manual_seed(11)
    model = lora_model(tiny_model(seed=2), rank=4, alpha=8)
    randomize_adapters(model, gen)
    model.eval()
    ids, mask = random_batch(gen)
    with torch.no_grad():
        adapted = model(ids, attention_mask=mask).logits
        adapted_loss = model(ids, attention_mask=mask, return_loss=True).loss
        with model.disable_adapter():
            plain = model(ids, attention_mask=mask).logits
    _, adapted_gen = model.start_generation(ids)
    assert (adapted - plain).abs().max() > 1e-2  # the adapters do change the output
    merged = merge_lora(model)
    assert type(merged) is RecBaseForCausalLM
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(ids, attention_mask=mask)
        got_loss = merged(ids, attention_mask=mask, return_loss=True).loss
    torch.testing.assert_close(got.logits, adapted, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_loss, adapted_loss, rtol=0, atol=1e-5)
    _, merged_gen = merged.start_generation(ids)  # the KV-cache path too
    torch.testing.assert_close(merged_gen, adapted_gen, rtol=0, atol=1e-5)


def test_lora_lowers_the_loss_on_a_domain_the_base_model_never_saw():
    base = tiny_model(seed=0)
    cfg = TrainConfig(epochs=3, tokens_per_batch=1024, lr=1e-2, warmup_steps=3, seed=0, progress=False,
                      patience=10)
    Trainer(base, synthetic_sequences(120, seed=1), [], cfg).fit()  # "pretraining" on domain A
    # domain B: other item codes and another chain; held-out users for validation
    domain_b = synthetic_sequences(150, seed=7)
    train_b, valid_b = domain_b[:120], domain_b[120:]
    model = lora_model(base)
    cfg = TrainConfig(epochs=8, tokens_per_batch=1024, lr=1e-2, warmup_steps=3, seed=0, progress=False,
                      patience=10)
    trainer = Trainer(model, train_b, valid_b, cfg)
    start = trainer.validate()
    state = trainer.fit()
    end = trainer.validate()
    assert end < 0.75 * start, (start, end)
    assert end < np.log(K)  # better than a uniform guess over the K codes: the new chain is learned
    assert state["history"][-1]["train_loss"] < state["history"][0]["train_loss"]


def test_save_and_load_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(3)
    model = lora_model(tiny_model(seed=4), rank=2, target_modules=["q_proj", "up_proj"])
    randomize_adapters(model, gen)
    model.eval()
    ids, mask = random_batch(gen)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    path = tmp_path / "adapters"
    save_lora(model, path)
    assert (path / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters"]  # no temp folders left behind

    fresh = tiny_model(seed=4)  # the same base weights, no adapters
    with torch.no_grad():
        plain = fresh(ids, attention_mask=mask).logits
    loaded = load_lora(fresh, path).eval()
    with torch.no_grad():
        got = loaded(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert (got - plain).abs().max() > 1e-2
    assert not any(p.requires_grad for p in loaded.parameters())  # inference by default

    # overwriting an existing folder replaces it with the new adapters
    randomize_adapters(model, gen)
    with torch.no_grad():
        expected2 = model(ids, attention_mask=mask).logits
    save_lora(model, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters"]
    reloaded = load_lora(tiny_model(seed=4), path, trainable=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, attention_mask=mask).logits, expected2, rtol=0, atol=0)
    assert any(p.requires_grad for p in reloaded.parameters())


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"rank must be an integer >= 1, got 0"):
        lora_model(tiny_model(), rank=0)
    with pytest.raises(ValueError, match=r"rank must be an integer >= 1, got 2.5"):
        lora_model(tiny_model(), rank=2.5)
    with pytest.raises(ValueError, match=r"target_modules must be .*q_proj.*got \['q_proj', 'qkv'\]"):
        lora_model(tiny_model(), target_modules=["q_proj", "qkv"])
    with pytest.raises(ValueError, match=r"target_modules.*unknown: \['lm_head'\]"):
        lora_model(tiny_model(), target_modules=["lm_head"])  # read as lm_head.weight: LoRA would be ignored
    with pytest.raises(ValueError, match="target_modules must be a non-empty"):
        lora_model(tiny_model(), target_modules=[])
    with pytest.raises(ValueError, match="alpha must be > 0"):
        lora_model(tiny_model(), alpha=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        lora_model(tiny_model(), dropout=1.0)
    base = tiny_model()
    wrapped = lora_model(base)
    with pytest.raises(ValueError, match="already carries LoRA adapters"):
        lora_model(base)
    with pytest.raises(TypeError, match="must be a RecBaseForCausalLM"):
        lora_model(wrapped)
    with pytest.raises(TypeError, match="peft_model must be a peft.PeftModel"):
        merge_lora(tiny_model())
    with pytest.raises(TypeError, match="peft_model must be a peft.PeftModel"):
        save_lora(tiny_model(), tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="no LoRA adapters"):
        load_lora(tiny_model(), tmp_path / "missing")
    frozen = tiny_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter that requires gradients"):
        Trainer(frozen, synthetic_sequences(4), [], TrainConfig(progress=False))
