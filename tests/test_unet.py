"""The IDDPM UNet: reference state-dict layout, reference numerics (attention layout,
fp32 GroupNorm, timestep embedding, zero init), every option, bf16 and channels_last."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import iddpm_ds
from iddpm_ds import ModelSpec, specs_from_flags
from iddpm_ds.models import SuperResModel, UNetModel, build_model
from iddpm_ds.models.nn import GroupNorm32, qkv_attention, timestep_embedding
from iddpm_ds.models.unet import AttentionBlock, ResBlock
from pairwise import pairwise_rows

KEY_FILE = Path(__file__).resolve().parent / "data" / "unet_state_dict_keys.txt"
# The configuration the key file was written for (reference flag names).
KEY_FILE_FLAGS = dict(image_size=32, num_channels=32, num_res_blocks=1,
                      attention_resolutions="16,8", num_heads=4, learn_sigma=True,
                      use_scale_shift_norm=True)
# The reference's model_and_diffusion_defaults().
REFERENCE_DEFAULTS = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
    attention_resolutions="16,8", dropout=0.0, learn_sigma=False, sigma_small=False,
    class_cond=False, diffusion_steps=1000, noise_schedule="linear", timestep_respacing="",
    use_kl=False, predict_xstart=False, rescale_timesteps=True, rescale_learned_sigmas=True,
    use_checkpoint=False, use_scale_shift_norm=True)


def reference_keys() -> list[tuple[str, tuple[int, ...]]]:
    """Parse `key (d0, d1, ...)` lines."""
    out = []
    for line in KEY_FILE.read_text().splitlines():
        if line.strip():
            key, shape = line.split(" ", 1)
            dims = shape.strip().strip("()").split(",")
            out.append((key, tuple(int(d) for d in dims if d.strip())))
    return out


def our_keys(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def randomize_zero_params(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the zero-initialised layers random weights so the output depends on everything."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def tiny_spec(**overrides) -> ModelSpec:
    fields = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
                  attention_resolutions="16,8", num_heads=2)
    fields.update(overrides)
    return ModelSpec(**fields)


def model_inputs(spec: ModelSpec, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, spec.image_size, spec.image_size, generator=gen)
    t = torch.tensor([3.0, 977.5][:batch] + [10.0] * max(0, batch - 2))
    kwargs = {}
    if spec.class_cond:
        kwargs["y"] = torch.arange(batch) % spec.num_classes
    if spec.small_size is not None:
        kwargs["low_res"] = torch.randn(batch, 3, spec.small_size, spec.small_size, generator=gen)
    return x, t, kwargs


# --- reference layout -----------------------------------------------------------------

def test_key_file_config_has_reference_keys_and_shapes():
    model_spec, _ = specs_from_flags(KEY_FILE_FLAGS)
    assert our_keys(build_model(model_spec)) == reference_keys()


def test_reference_shaped_state_dict_loads_strict():
    model_spec, _ = specs_from_flags(KEY_FILE_FLAGS)
    model = build_model(model_spec)
    gen = torch.Generator().manual_seed(1)
    state = {k: torch.randn(shape, generator=gen) for k, shape in reference_keys()}
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    # and the other way: ours has nothing the reference would reject
    assert set(model.state_dict()) == set(state)


def test_parameter_count_equals_key_file_total():
    model_spec, _ = specs_from_flags(KEY_FILE_FLAGS)
    total = sum(math.prod(shape) for _, shape in reference_keys())
    assert sum(p.numel() for p in build_model(model_spec).parameters()) == total


# --- numerics ---------------------------------------------------------------------------

def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 1.0, 17.25, 999.0])
    for dim in (32, 33):
        emb = timestep_embedding(t, dim)
        half = dim // 2
        freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
        args = t.double().numpy()[:, None] * freqs[None]
        expected = np.concatenate([np.cos(args), np.sin(args)], axis=1)
        assert emb.shape == (4, dim) and emb.dtype == torch.float32
        np.testing.assert_allclose(emb[:, :2 * half].double().numpy(), expected, atol=1e-4)
        if dim % 2:
            assert torch.all(emb[:, -1] == 0)
    # t = 0: all cosines 1, all sines 0
    assert torch.equal(timestep_embedding(torch.zeros(1), 8), torch.tensor([[1.0] * 4 + [0.0] * 4]))


def reference_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The reference formula, written out: [B*heads, 3*ch, L] split into q, k, v per head,
    weights softmax(q^T k / sqrt(ch)) in float32, output head-major [B, heads*ch, L]."""
    batch, _, length = qkv.shape
    per_head = qkv.reshape(batch * num_heads, -1, length)
    ch = per_head.shape[1] // 3
    q, k, v = per_head.split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
    out = torch.einsum("bts,bcs->bct", weight, v)
    return out.reshape(batch, -1, length)


@pytest.mark.parametrize("num_heads", [1, 2, 4])
def test_sdpa_attention_matches_reference_einsum(num_heads):
    gen = torch.Generator().manual_seed(num_heads)
    qkv = torch.randn(3, 3 * 64, 40, generator=gen) * 2  # large logits: softmax is peaked
    expected = reference_attention(qkv, num_heads)
    torch.testing.assert_close(qkv_attention(qkv, num_heads), expected, atol=1e-5, rtol=1e-5)
    if num_heads > 1:
        # the layout matters: the q/k/v-outermost ("new") order gives something else
        # [B, (q|k|v), heads, ch, L] -> per-head [q_h, k_h, v_h] blocks
        other = reference_attention(qkv.reshape(3, 3, num_heads, -1, 40).transpose(1, 2)
                                    .reshape(3, -1, 40), num_heads)
        assert (other - expected).abs().max() > 1e-2


def test_attention_block_matches_reference_formula():
    block = randomize_zero_params(AttentionBlock(64, num_heads=4))
    with torch.no_grad():
        block.norm.weight.uniform_(0.5, 1.5)
        block.norm.bias.normal_()
    x = torch.randn(2, 64, 6, 5)
    flat = x.reshape(2, 64, 30)
    normed = F.group_norm(flat.float(), 32, block.norm.weight, block.norm.bias, 1e-5)
    qkv = F.conv1d(normed, block.qkv.weight, block.qkv.bias)
    h = F.conv1d(reference_attention(qkv, 4), block.proj_out.weight, block.proj_out.bias)
    expected = (flat + h).reshape(2, 64, 6, 5)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_group_norm32_computes_in_float32():
    norm = GroupNorm32(32, 64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    norm = norm.to(torch.bfloat16)
    x = (torch.randn(2, 64, 4, 4) * 30 + 100).to(torch.bfloat16)
    out = norm(x)
    expected = F.group_norm(x.float(), 32, norm.weight.float(), norm.bias.float(), 1e-5)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected.to(torch.bfloat16))
    # float32 parameters with a bf16 input (the reference's half-precision set-up)
    out = norm.float()(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected.to(torch.bfloat16))
    # float64 in: still computed in float32 (the reference casts with .float())
    x64 = torch.randn(2, 64, 4, 4, dtype=torch.float64) * 30 + 100
    out = norm(x64)
    assert out.dtype == torch.float64
    assert torch.equal(out, F.group_norm(x64.float(), 32, norm.weight, norm.bias, 1e-5).double())


@pytest.mark.parametrize("scale_shift", [False, True])
def test_res_block_matches_formula(scale_shift):
    block = randomize_zero_params(ResBlock(32, 128, 0.0, out_channels=64,
                                           use_scale_shift_norm=scale_shift))
    x, emb = torch.randn(2, 32, 5, 5), torch.randn(2, 128)
    h = F.conv2d(F.silu(F.group_norm(x, 32, block.in_layers[0].weight, block.in_layers[0].bias)),
                 block.in_layers[2].weight, block.in_layers[2].bias, padding=1)
    emb_out = F.linear(F.silu(emb), block.emb_layers[1].weight, block.emb_layers[1].bias)[..., None, None]
    norm = block.out_layers[0]
    if scale_shift:
        scale, shift = emb_out[:, :64], emb_out[:, 64:]
        h = F.group_norm(h, 32, norm.weight, norm.bias) * (1 + scale) + shift
    else:
        h = F.group_norm(h + emb_out, 32, norm.weight, norm.bias)
    h = F.conv2d(F.silu(h), block.out_layers[3].weight, block.out_layers[3].bias, padding=1)
    skip = F.conv2d(x, block.skip_connection.weight, block.skip_connection.bias)
    torch.testing.assert_close(block(x, emb), skip + h, atol=1e-5, rtol=1e-5)


# --- model behaviour --------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    dict(), dict(class_cond=True, num_classes=5), dict(small_size=8),
    dict(use_scale_shift_norm=False, learn_sigma=True)])
def test_fresh_model_outputs_exactly_zero(overrides):
    spec = tiny_spec(**overrides)
    x, t, kwargs = model_inputs(spec)
    out = build_model(spec)(x, t, **kwargs)
    assert out.shape == (2, spec.out_channels, 16, 16)
    assert torch.equal(out, torch.zeros_like(out))


def test_class_conditioning_changes_output():
    spec = tiny_spec(class_cond=True, num_classes=5)
    model = randomize_zero_params(build_model(spec))
    x, t, _ = model_inputs(spec)
    out0 = model(x, t, y=torch.tensor([0, 0]))
    out1 = model(x, t, y=torch.tensor([3, 3]))
    assert (out0 - out1).abs().max() > 1e-4
    # each sample only sees its own label
    mixed = model(x, t, y=torch.tensor([0, 3]))
    torch.testing.assert_close(mixed[0], out0[0])
    torch.testing.assert_close(mixed[1], out1[1])


def test_timesteps_change_output():
    spec = tiny_spec()
    model = randomize_zero_params(build_model(spec))
    x, _, _ = model_inputs(spec)
    a = model(x, torch.tensor([5.0, 5.0]))
    b = model(x, torch.tensor([5.0, 800.0]))
    torch.testing.assert_close(a[0], b[0])
    assert (a[1] - b[1]).abs().max() > 1e-4


def test_y_and_low_res_are_checked():
    spec = tiny_spec()
    x, t, _ = model_inputs(spec)
    with pytest.raises(ValueError, match="class-conditional"):
        build_model(spec)(x, t, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class-conditional"):
        build_model(tiny_spec(class_cond=True, num_classes=3))(x, t)
    with pytest.raises(ValueError, match="low_res"):
        build_model(tiny_spec(small_size=8))(x, t)


def test_super_res_concatenates_bilinear_upsample_after_x():
    spec = tiny_spec(small_size=8)
    sr = randomize_zero_params(build_model(spec))
    assert isinstance(sr, SuperResModel) and sr.input_blocks[0][0].weight.shape[1] == 6
    plain = UNetModel(6, 32, 3, 1, spec.attention_ds, channel_mult=(1, 2), num_heads=2,
                      use_scale_shift_norm=True)
    plain.load_state_dict(sr.state_dict(), strict=True)
    x, t, kwargs = model_inputs(spec)
    up = F.interpolate(kwargs["low_res"], size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(sr(x, t, **kwargs), plain(torch.cat([x, up], 1), t))


OPTION_NAMES = ("learn_sigma", "class_cond", "use_scale_shift_norm", "num_heads_upsample",
                "dropout", "use_checkpoint", "explicit_mult", "super_res")


def option_spec(flags: tuple[bool, ...]) -> ModelSpec:
    o = dict(zip(OPTION_NAMES, flags))
    fields = dict(num_channels=32, num_res_blocks=1, attention_resolutions="16,8", num_heads=2,
                  learn_sigma=o["learn_sigma"], class_cond=o["class_cond"], num_classes=7,
                  use_scale_shift_norm=o["use_scale_shift_norm"],
                  num_heads_upsample=1 if o["num_heads_upsample"] else -1,
                  dropout=0.1 if o["dropout"] else 0.0, use_checkpoint=o["use_checkpoint"])
    fields.update(dict(image_size=16, channel_mult=(1, 2)) if o["explicit_mult"] else dict(image_size=32))
    if o["super_res"]:
        fields["small_size"] = fields["image_size"] // 2
    return ModelSpec(**fields)


# Every pair of options at every pair of values (not all 2^8 combinations): interactions
# of two options are where the layout bugs live; the all-off and all-on rows are added so
# the plainest and the fullest model are always built.
OPTION_ROWS = sorted(set(pairwise_rows([(False, True)] * len(OPTION_NAMES)))
                     | {(False,) * len(OPTION_NAMES), (True,) * len(OPTION_NAMES)})


def test_option_rows_cover_every_pair_of_option_values():
    n = len(OPTION_NAMES)
    for i, j in itertools.combinations(range(n), 2):
        for a, b in itertools.product((False, True), repeat=2):
            assert any(row[i] == a and row[j] == b for row in OPTION_ROWS), \
                (OPTION_NAMES[i], a, OPTION_NAMES[j], b)
    assert all(len(row) == n for row in OPTION_ROWS)
    assert len(OPTION_ROWS) <= 12  # vs 2^8 = 256 for the full product
    # the generator on a grid of mixed sizes: every pair, and far fewer rows than 3*2*4*3
    values = [(0, 1, 2), ("a", "b"), (None, 1.5, "x", -1), (True, False, 7)]
    rows = pairwise_rows(values)
    for i, j in itertools.combinations(range(len(values)), 2):
        for a, b in itertools.product(values[i], values[j]):
            assert any(row[i] == a and row[j] == b for row in rows), (i, a, j, b)
    assert len(rows) <= 16


@pytest.mark.parametrize("flags", OPTION_ROWS,
                         ids=lambda f: "-".join(n for n, on in zip(OPTION_NAMES, f) if on) or "base")
def test_every_option_pair_trains(flags):
    spec = option_spec(flags)
    model = randomize_zero_params(build_model(spec), seed=sum(flags))
    x, t, kwargs = model_inputs(spec, seed=3)
    out = model(x, t, **kwargs)
    assert out.shape == (2, spec.out_channels, spec.image_size, spec.image_size)
    (out ** 2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, f"{name} gets no gradient"


def test_conv_resample_off_and_other_dims():
    model = randomize_zero_params(UNetModel(3, 32, 3, 1, (2,), channel_mult=(1, 2), conv_resample=False))
    assert not any(".op." in k or ".conv." in k for k in model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    assert model(x, torch.tensor([1.0, 2.0])).shape == (2, 3, 8, 8)
    for dims, shape in ((1, (2, 3, 16)), (3, (1, 3, 2, 8, 8))):
        model = UNetModel(3, 32, 4, 1, (2,), channel_mult=(1, 2), dims=dims, num_heads=2)
        out = randomize_zero_params(model)(torch.randn(shape), torch.ones(shape[0]))
        assert out.shape == (shape[0], 4, *shape[2:])


def test_checkpointing_matches_plain_outputs_and_grads():
    spec = tiny_spec(dropout=0.2, class_cond=True, num_classes=4)
    plain = randomize_zero_params(build_model(spec))
    ckpt = build_model(spec.model_copy(update=dict(use_checkpoint=True)))
    ckpt.load_state_dict(plain.state_dict())
    x, t, kwargs = model_inputs(spec)
    results = []
    for model in (plain, ckpt):
        saved = []
        torch.manual_seed(123)  # same dropout masks; checkpoint must replay them
        with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s.numel()) or s,
                                                      lambda s: s):
            out = model(x, t, **kwargs)
        out.square().mean().backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}, sum(saved)))
    (out_p, grads_p, saved_p), (out_c, grads_c, saved_c) = results
    torch.testing.assert_close(out_c, out_p, atol=0, rtol=0)
    for name, g in grads_p.items():
        torch.testing.assert_close(grads_c[name], g, atol=1e-6, rtol=1e-5, msg=name)
    assert saved_c < saved_p / 2  # checkpointing really drops the activations


def test_channels_last_gives_same_output():
    spec = tiny_spec(class_cond=True, num_classes=3, learn_sigma=True)
    model = randomize_zero_params(build_model(spec))
    x, t, kwargs = model_inputs(spec)
    expected = model(x, t, **kwargs)
    model_cl = model.to(memory_format=torch.channels_last)
    out = model_cl(x.contiguous(memory_format=torch.channels_last), t, **kwargs)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)  # no layout flip on the way
    out.sum().backward()  # backward works through the channels_last path too


@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float32])
def test_bf16_model_runs(input_dtype):
    spec = tiny_spec(class_cond=True, num_classes=3, learn_sigma=True, small_size=8)
    model = randomize_zero_params(build_model(spec))
    x, t, kwargs = model_inputs(spec)
    expected = model(x, t, **kwargs)
    model = model.to(torch.bfloat16)
    kwargs["low_res"] = kwargs["low_res"].to(input_dtype)
    out = model(x.to(input_dtype), t, **kwargs)  # timesteps stay float32
    assert out.dtype == input_dtype
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    err = (out.float() - expected).abs().max() / expected.abs().max()
    assert err < 0.1, err


def test_bad_channel_counts_are_clear_errors():
    with pytest.raises(ValueError, match="divisible by 32"):
        UNetModel(3, 48, 3, 1, (2,), channel_mult=(1, 2))
    with pytest.raises(ValueError, match="heads"):  # the middle block always attends
        UNetModel(3, 32, 3, 1, (), channel_mult=(1, 2), num_heads=3)
    with pytest.raises(ValueError, match="heads"):  # up-path attention at rate 2, 64 channels
        UNetModel(3, 32, 3, 1, (2,), channel_mult=(1, 2), num_heads=1, num_heads_upsample=5)
    # no up-path attention: num_heads_upsample is unused and need not divide anything
    UNetModel(3, 32, 3, 1, (), channel_mult=(1, 2), num_heads=1, num_heads_upsample=5)


# --- construction entry points ----------------------------------------------------------

def test_build_model_entry_points():
    spec = ModelSpec(**{**KEY_FILE_FLAGS, "attention_resolutions": (16, 8)})
    model = iddpm_ds.build_model(spec)
    assert type(model) is UNetModel and our_keys(model) == reference_keys()
    assert model.attention_resolutions == (2, 4) and model.num_heads_upsample == 4

    flags = {**REFERENCE_DEFAULTS, **KEY_FILE_FLAGS}
    model_spec, diffusion_spec = specs_from_flags(flags)
    assert diffusion_spec.learn_sigma
    assert our_keys(iddpm_ds.build_model(model_spec)) == reference_keys()

    sr_flags = {k: v for k, v in REFERENCE_DEFAULTS.items() if k != "image_size"}
    sr_flags.update(large_size=32, small_size=16, num_channels=32, num_res_blocks=1,
                    class_cond=True)
    sr_spec, _ = specs_from_flags(sr_flags)
    sr = iddpm_ds.build_model(sr_spec)
    assert type(sr) is SuperResModel and sr.num_classes == 1000
    assert sr.input_blocks[0][0].weight.shape == (32, 6, 3, 3)
    assert sr.out[2].weight.shape == (3, 32, 3, 3)
