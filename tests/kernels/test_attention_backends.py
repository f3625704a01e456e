"""Attention backends against diffusers' default processor: outputs and gradients, masks, restore, fallbacks.

CPU tests run every backend name in float32 on the tiny SD 1.5 / SDXL UNets (tests/tiny_pipelines.py) and
the embedded digits UNets; on CPU the GPU-only kernels (efficient, cudnn) and xformers run through their fallback,
which must give the same numbers. GPU tests (``-m gpu``) check fp16 / bf16 agreement on CUDA, where each kernel
really runs.
"""

import copy
import importlib.util
import os
import sys
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor2_0, AttnProcessor2_0  # noqa: E402

from diffalign.kernels import (  # noqa: E402
    DiffalignAttnProcessor,
    available_backends,
    backend_names,
    get_attention_backend,
    set_attention_backend,
)
from diffalign.kernels import attention as attention_module  # noqa: E402
from diffalign.models.digits import load_digits_unet  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tiny_pipelines import make_sd_pipeline, make_sdxl_pipeline  # noqa: E402

BACKENDS = [name for name in backend_names() if name != "default"]
MODELS = ("sd", "sdxl", "digits", "digits-cond")
TOL = 1e-5  # float32: measured max |difference| is 0 for most backends and < 3e-7 for sdpa:math (outputs, gradients)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Run the tiny models on one thread: thread start-up costs more than they compute, badly so on a busy box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_warnings():
    """Each test sees the once-per-process warnings afresh."""
    attention_module._warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    return {
        "sd": make_sd_pipeline(tmp_path_factory.mktemp("sd")),
        "sdxl": make_sdxl_pipeline(tmp_path_factory.mktemp("sdxl")),
    }


def model_inputs(unet, batch: int = 2, masked: bool = True) -> dict:
    """Seeded inputs: sample, timestep, and for conditional UNets text states (half the tokens masked) and SDXL's
    added conditioning."""
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    size = config.sample_size
    inputs = {"sample": torch.randn(batch, config.in_channels, size, size, generator=generator), "timestep": 500}
    if hasattr(config, "cross_attention_dim"):
        tokens = 1 if config.in_channels == 1 else 12
        inputs["encoder_hidden_states"] = torch.randn(batch, tokens, config.cross_attention_dim, generator=generator)
        if masked and tokens > 1:
            mask = torch.ones(batch, tokens)
            mask[:, tokens // 2 :] = 0.0  # padding tokens
            inputs["encoder_attention_mask"] = mask
    if getattr(config, "addition_embed_type", None) == "text_time":
        text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_dim, generator=generator),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1),
        }
    return inputs


def forward_backward(unet, inputs: dict) -> dict[str, torch.Tensor]:
    """The output and the gradients of a fixed random projection of it w.r.t. the inputs and every parameter."""
    unet.zero_grad(set_to_none=True)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items() if k in ("sample", "encoder_hidden_states")}
    out = unet(**(inputs | leaves)).sample
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    (out * weights).sum().backward()
    results = {"output": out.detach()}
    results |= {f"d/d {k}": v.grad for k, v in leaves.items()}
    results |= {f"d/d {n}": p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    return results


@pytest.fixture(scope="module")
def models(pipelines):
    """Each model with its inputs and its default-processor outputs and gradients."""
    unets = {
        "sd": pipelines["sd"].unet,
        "sdxl": pipelines["sdxl"].unet,
        "digits": load_digits_unet(),
        "digits-cond": load_digits_unet(conditional=True),
    }
    cases = {}
    for name, unet in unets.items():
        inputs = model_inputs(unet, masked=name != "sdxl")
        cases[name] = (unet, inputs, forward_backward(unet, inputs))
    return cases


def processors(model) -> dict:
    """Every diffusers ``Attention`` layer's processor, by layer name (``UNet2DModel`` has no ``attn_processors``)."""
    return {name: layer.processor for name, layer in model.named_modules() if isinstance(layer, Attention)}


def max_differences(results: dict, reference: dict) -> dict[str, float]:
    """Max |difference| of the output, of each input's gradient, and of the parameters' gradients (one group), each
    relative to its group's largest reference entry where that exceeds 1 (parameter gradients reach ~100, and some,
    such as key biases under softmax, are zero up to round-off, so a per-tensor relative error means nothing)."""
    assert results.keys() == reference.keys()
    inputs = ("output", "d/d sample", "d/d encoder_hidden_states")
    groups = {k: [k] for k in reference if k in inputs}
    groups["parameter gradients"] = [k for k in reference if k not in groups]
    differences = {}
    for group, keys in groups.items():
        scale = max(reference[k].abs().max().item() for k in keys)
        differences[group] = max((results[k] - reference[k]).abs().max().item() for k in keys) / max(scale, 1.0)
    return differences


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_default_forward_and_backward(models, model, backend):
    unet, inputs, reference = models[model]
    state_keys = set(unet.state_dict())
    try:
        patched = set_attention_backend(unet, backend)
        assert patched == len(processors(unet)) > 0
        assert all(isinstance(p, DiffalignAttnProcessor) for p in processors(unet).values())
        assert get_attention_backend(unet) == backend
        differences = max_differences(forward_backward(unet, inputs), reference)
        worst = max(differences, key=differences.get)
        assert differences[worst] <= TOL, f"{backend} on {model}: {worst} differs by {differences[worst]:.2e}"
    finally:
        set_attention_backend(unet, "default")
    assert set(unet.state_dict()) == state_keys  # fused projections add no parameters
    assert all(type(p) is AttnProcessor2_0 for p in processors(unet).values())
    restored = forward_backward(unet, inputs)
    assert all(torch.equal(restored[k], reference[k]) for k in reference), "default did not restore exact outputs"


@pytest.mark.parametrize("backend", ["sdpa:math", "fused", "xformers"])
def test_pipeline_switch_patches_unet_and_vae_and_default_restores_them(pipelines, backend):
    pipe = pipelines["sd"]
    originals = {name: processors(getattr(pipe, name)) for name in ("unet", "vae")}
    count = set_attention_backend(pipe, backend)
    assert count == sum(len(p) for p in originals.values()) and len(originals["vae"]) >= 1
    assert all(isinstance(p, DiffalignAttnProcessor) for p in processors(pipe.vae).values())
    set_attention_backend(pipe, "default")
    for name, before in originals.items():
        assert all(p is before[k] for k, p in processors(getattr(pipe, name)).items())


def attention_layers() -> dict[str, tuple[Attention, dict]]:
    """Single ``Attention`` layers covering the processor contract: masks, 4-D inputs with group norm, residual and
    rescale (UNet2DModel blocks), cross-attention norm, spatial norm, and added KV with and without self keys."""
    torch.manual_seed(0)
    batch, tokens = 2, 7
    context = torch.randn(batch, tokens, 16)
    x3, x4 = torch.randn(batch, 10, 32), torch.randn(batch, 32, 3, 3)
    self_mask = torch.randn(batch, 10, 10)  # additive, (B, Lq, Lk)
    key_mask = torch.zeros(batch, 1, tokens).masked_fill(torch.rand(batch, 1, tokens) < 0.4, -10000.0)
    layers = {
        "self, (B, Lq, Lk) mask": (
            Attention(32, heads=4, dim_head=8),
            dict(hidden_states=x3, attention_mask=self_mask),
        ),
        "cross, key mask": (
            Attention(32, cross_attention_dim=16, heads=4, dim_head=8, bias=True),
            dict(hidden_states=x3, encoder_hidden_states=context, attention_mask=key_mask),
        ),
        "cross, layer-norm context": (
            Attention(32, cross_attention_dim=16, heads=2, dim_head=16, cross_attention_norm="layer_norm"),
            dict(hidden_states=x3, encoder_hidden_states=context),
        ),
        "4-D, group norm, residual, rescale": (
            Attention(32, heads=2, dim_head=16, norm_num_groups=8, residual_connection=True, rescale_output_factor=2),
            dict(hidden_states=x4),
        ),
        "4-D, spatial norm": (
            Attention(32, heads=1, dim_head=32, spatial_norm_dim=4, residual_connection=True),
            dict(hidden_states=x4, temb=torch.randn(batch, 4, 2, 2)),
        ),
    }
    for only_cross in (False, True):
        attn = Attention(
            32, cross_attention_dim=32, heads=4, dim_head=8, added_kv_proj_dim=16, norm_num_groups=8,
            only_cross_attention=only_cross, processor=AttnAddedKVProcessor2_0(),
        )  # fmt: skip
        kwargs = dict(hidden_states=x4, encoder_hidden_states=context)
        layers[f"added KV, only_cross_attention={only_cross}"] = (attn, kwargs)
    return layers


@pytest.mark.parametrize("case", list(attention_layers()))
def test_processor_contract_on_single_layers(case):
    attn, kwargs = attention_layers()[case]
    assert type(attn.processor) in (AttnProcessor2_0, AttnAddedKVProcessor2_0)

    def forward_backward_layer() -> list[torch.Tensor]:
        attn.zero_grad(set_to_none=True)
        leaves = {k: v.clone().requires_grad_(True) for k, v in kwargs.items()}
        out = attn(**leaves)
        out.square().sum().backward()
        grads = [v.grad for v in leaves.values()] + [p.grad for p in attn.parameters() if p.grad is not None]
        return [out.detach(), *grads]

    reference = forward_backward_layer()
    for backend in BACKENDS:
        set_attention_backend(attn, backend)
        results = forward_backward_layer()
        assert len(results) == len(reference)
        errors = [(r - e).abs().max().item() for r, e in zip(results, reference, strict=True)]
        assert max(errors) <= TOL, f"{backend}: max |difference| {max(errors):.2e}"
    set_attention_backend(attn, "default")
    assert all(torch.equal(r, e) for r, e in zip(forward_backward_layer(), reference, strict=True))


def test_fused_projections_follow_weight_updates_under_no_grad():
    attn, kwargs = attention_layers()["cross, key mask"]
    set_attention_backend(attn, "fused")
    with torch.no_grad():
        first = attn(**kwargs)
        attn.to_k.weight.mul_(2.0)  # an optimizer step or load_state_dict changes the weights in place
        second = attn(**kwargs)
        attn.set_processor(AttnProcessor2_0())
        expected = attn(**kwargs)
    assert (second - expected).abs().max() <= TOL and (second - first).abs().max() > 1e-3


def test_gpu_only_kernels_fall_back_on_cpu_with_one_warning(models):
    unet, inputs, reference = models["digits"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        set_attention_backend(unet, "sdpa:cudnn")
        with torch.no_grad():
            outputs = [unet(**inputs).sample for _ in range(2)]
        set_attention_backend(unet, "default")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "'sdpa:cudnn' has no kernel for cpu" in messages[0], messages
    assert all((out - reference["output"]).abs().max() <= TOL for out in outputs)


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_missing_xformers_falls_back_with_one_warning(models):
    unet = models["digits"][0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            set_attention_backend(unet, "xformers")
        set_attention_backend(unet, "default")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert messages == ["xformers is not installed; attention backend 'xformers' uses 'sdpa'."]


def test_xformers_path_layout_and_mask_with_a_stand_in_module(models, monkeypatch):
    """The xformers kernel's (B, L, H, D) layout and its padded bias, checked through a stand-in for xformers.ops."""
    import types
    from importlib.machinery import ModuleSpec

    calls = []

    def memory_efficient_attention(query, key, value, attn_bias=None, scale=None):  # (B, L, H, D)
        calls.append(attn_bias is not None and attn_bias.stride(-2) % 8 == 0)
        scores = torch.einsum("bqhd,bkhd->bhqk", query, key) * scale
        if attn_bias is not None:
            scores = scores + attn_bias
        return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), value)

    xformers = types.ModuleType("xformers")
    xformers.__spec__ = ModuleSpec("xformers", None)
    xformers.ops = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setitem(sys.modules, "xformers", xformers)
    monkeypatch.setitem(sys.modules, "xformers.ops", xformers.ops)
    unet, inputs, reference = models["sd"]
    try:
        set_attention_backend(unet, "xformers")
        differences = max_differences(forward_backward(unet, inputs), reference)
    finally:
        set_attention_backend(unet, "default")
    assert max(differences.values()) <= TOL
    assert True in calls and False in calls  # masked cross-attention (aligned bias) and unmasked self-attention


def test_bad_names_and_objects_raise_clear_errors():
    attn = Attention(8, heads=1, dim_head=8)
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash'; expected one of \['default', 'sdpa'"):
        set_attention_backend(attn, "flash")
    with pytest.raises(ValueError, match="unknown attention backend 'xformers:flash'"):
        set_attention_backend(attn, "xformers:flash")
    with pytest.raises(TypeError, match="must be a str"):
        set_attention_backend(attn, None)
    with pytest.raises(TypeError, match="takes a diffusers pipeline or a torch model"):
        set_attention_backend("unet", "sdpa")
    with pytest.raises(ValueError, match="has no diffusers Attention layers"):
        set_attention_backend(torch.nn.Linear(2, 2), "sdpa")
    assert set_attention_backend(attn, "SDPA:Math") == 1 and get_attention_backend(attn) == "SDPA:Math"


def test_available_backends_on_cpu():
    names = available_backends("cpu")
    assert {"default", "sdpa", "sdpa:math", "fused", "fused:math"} <= set(names)
    assert not {"sdpa:cudnn", "sdpa:efficient", "xformers"} & set(names)
    assert set(names) <= set(backend_names())


# --- GPU: fp16 / bf16 agreement with the default processor, and each kernel really running ---------------------------

GPU_TOL = {torch.float16: 2e-2, torch.bfloat16: 1e-1}
"""Max |difference| of outputs (entries of order 1) from the default processor's in the same dtype: a few units in
the last place of fp16 (10 mantissa bits) / bf16 (7 bits) compounded through the tiny UNets."""
HALF = pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])


def to_cuda(inputs: dict, dtype: torch.dtype) -> dict:
    moved = {}
    for key, value in inputs.items():
        if isinstance(value, dict):
            moved[key] = to_cuda(value, dtype)
        else:
            moved[key] = value.to("cuda", dtype) if torch.is_tensor(value) else value
    return moved


@pytest.mark.gpu
@HALF
@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_gpu_backends_agree_in_half_precision(pipelines, model, dtype):
    """Every backend (fallbacks included) against the default processor on CUDA: output, input gradient."""
    unet = copy.deepcopy(pipelines[model].unet).to("cuda", dtype)
    inputs = to_cuda(model_inputs(unet, masked=False), dtype)
    reference = forward_backward(unet, inputs)
    for backend in BACKENDS:
        set_attention_backend(unet, backend)
        results = forward_backward(unet, inputs)
        set_attention_backend(unet, "default")
        error = (results["output"] - reference["output"]).abs().max().item()
        assert error <= GPU_TOL[dtype], f"{backend} {dtype}: output differs by {error:.3e}"
        grad, grad_reference = results["d/d sample"].float().flatten(), reference["d/d sample"].float().flatten()
        cosine = torch.nn.functional.cosine_similarity(grad, grad_reference, dim=0).item()
        assert cosine > 0.99, f"{backend} {dtype}: input gradient cosine {cosine:.4f}"


def layer_forward_backward(attn: Attention, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """An attention layer's output and the gradient of its sum of squares w.r.t. ``hidden_states``, in float32."""
    attn.zero_grad(set_to_none=True)
    hidden_states = kwargs["hidden_states"].clone().requires_grad_(True)
    out = attn(**(kwargs | {"hidden_states": hidden_states}))
    out.float().square().sum().backward()  # a sum keeps fp16 gradients out of the subnormal range
    return out.detach().float(), hidden_states.grad.float()


@pytest.mark.gpu
@HALF
@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "key mask"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_gpu_kernels_run_natively_and_agree(dtype, masked, cross):
    """flash, efficient and cuDNN attention run without falling back (only the named kernel is enabled, so a run
    without a fallback warning is a run of that kernel) on SD-like layers: head size 64, 1024 queries, self or cross
    attention (77 keys), forward and backward. With a key mask, only efficient attention is required to run."""
    torch.manual_seed(0)
    attn = Attention(128, cross_attention_dim=96 if cross else None, heads=2, dim_head=64).to("cuda", dtype)
    generator = torch.Generator("cuda").manual_seed(0)
    kwargs = {"hidden_states": torch.randn(2, 1024, 128, device="cuda", dtype=dtype, generator=generator)}
    if cross:
        kwargs["encoder_hidden_states"] = torch.randn(2, 77, 96, device="cuda", dtype=dtype, generator=generator)
    if masked:
        keys = 77 if cross else 1024
        kwargs["attention_mask"] = torch.zeros(2, 1, keys, device="cuda", dtype=dtype)
        kwargs["attention_mask"][..., keys // 2 :] = -10000.0
    kernels = ["sdpa:efficient", "fused:efficient"] if masked else ["sdpa:flash", "sdpa:efficient", "fused:flash"]
    if torch.cuda.get_device_capability() >= (9, 0) and not masked:
        kernels.append("sdpa:cudnn")
    reference = layer_forward_backward(attn, kwargs)
    for backend in kernels:
        attention_module._warned.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            set_attention_backend(attn, backend)
            results = layer_forward_backward(attn, kwargs)
        set_attention_backend(attn, "default")
        fallbacks = [str(w.message) for w in caught if "has no kernel" in str(w.message)]
        assert not fallbacks, f"{backend} fell back: {fallbacks}"
        for result, expected in zip(results, reference, strict=True):
            scale = expected.abs().max().item()
            error = (result - expected).abs().max().item()
            assert error <= GPU_TOL[dtype] * scale, f"{backend}: max |difference| {error:.2e} of max {scale:.2e}"


@pytest.mark.gpu
def test_gpu_kernels_are_available():
    names = set(available_backends("cuda", torch.float16))
    assert {"sdpa", "sdpa:flash", "sdpa:efficient", "sdpa:math", "fused:flash"} <= names, names
    if torch.cuda.get_device_capability() >= (9, 0):
        assert "sdpa:cudnn" in names, names


def test_bench_targets_and_cli_apply_the_backend(tmp_path_factory, monkeypatch, capsys):
    import diffalign.kernels
    from diffalign.cli import main
    from diffalign.evaluation.targets import load_target

    calls = []

    def spy(model, name):
        calls.append((type(model).__name__, name))
        return set_attention_backend(model, name)

    monkeypatch.setattr(diffalign.kernels, "set_attention_backend", spy)
    default, fused = load_target("digits"), load_target("digits", attention="fused")
    folder = make_sd_pipeline(tmp_path_factory.mktemp("bench")).name_or_path
    sd = load_target(folder, prompts=["a cat"], attention="sdpa:math")
    assert calls == [("UNet2DModel", "fused"), ("StableDiffusionPipeline", "sdpa:math")]
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert (fused.model(x, 500) - default.model(x, 500)).abs().max() <= TOL
    assert sd.model(torch.randn(2, *sd.sample_shape), 500).isfinite().all()
    with pytest.raises(SystemExit):
        main(["bench", "--attention", "flash"])
    assert "unknown attention backend 'flash'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--model", "gmm", "--attention", "sdpa"])
    assert "'gmm' has no attention" in capsys.readouterr().err


def test_lora_adapters_train_through_every_backend(tmp_path_factory):
    """With peft LoRA on to_q / to_k / to_v / to_out (as the trainer sets it up), fused projections step aside for
    the adapted layers, and every backend gives the default's output and LoRA gradients."""
    from peft import LoraConfig

    unet = make_sd_pipeline(tmp_path_factory.mktemp("lora")).unet
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    inputs = model_inputs(unet)
    reference = forward_backward(unet, inputs)
    lora_grads = [k for k in reference if "lora_" in k]
    assert len(lora_grads) == len(reference) - 3  # output, d/d sample, d/d text: every other gradient is LoRA's
    for backend in ("fused", "sdpa:math", "sdpa:flash"):
        set_attention_backend(unet, backend)
        differences = max_differences(forward_backward(unet, inputs), reference)
        assert max(differences.values()) <= TOL, (backend, differences)
    set_attention_backend(unet, "default")
