"""Compact weights (t2i.compact): 16-bit storage, float32 compute, bit-identical to float32 on the
same rounded weights; loaders read files straight into it; LoRA merges and int8 on top of it."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import save_file

from t2i.adapters.lora import apply_loras
from t2i.checkpoints.io import CheckpointError, load_state_dict
from t2i.compact import compact_, compact_cast, is_compact, parameter_bytes, uncompact_
from t2i.nets.unet import UNet
from t2i.quantize import int8_layers, precision_of, quantize_
from t2i.systems import stable_diffusion as sd


def _rounded(net: torch.nn.Module, like: torch.nn.Module) -> torch.nn.Module:
    """`net` (float32) given the values `like` holds, widened: "fp32 weights rounded to 16 bits and back"."""
    with torch.no_grad():
        state = like.state_dict()
        for k, v in net.state_dict().items():
            v.copy_(state[k].float())
    return net


def _unet_pair(storage: torch.dtype) -> tuple[UNet, UNet]:
    torch.manual_seed(0)
    ref = UNet(sd.TINY_UNET).eval()
    with torch.no_grad():
        ref.conv_out.weight.mul_(8)  # a random tiny U-Net barely moves its input otherwise (DESIGN.md)
    fp32 = UNet(sd.TINY_UNET).eval()
    fp32.load_state_dict(ref.state_dict())
    return compact_(ref, storage), _rounded(fp32, ref)


def _unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10.0, 700.0]),
            torch.randn(2, 7, sd.TINY_UNET.context_dim, generator=g))


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16])
def test_unet_is_bit_identical_to_float32_on_the_rounded_weights(storage):
    compact, fp32 = _unet_pair(storage)
    x, t, ctx = _unet_inputs()
    with torch.no_grad():
        out, ref = compact(x, t, ctx), fp32(x, t, ctx)
    assert out.dtype == torch.float32
    assert torch.equal(out, ref)
    assert ref.std() > 0.1  # a real output, not a constant
    assert {p.dtype for p in compact.parameters()} == {storage, torch.float32}
    assert compact.conv_out.weight.dtype == storage  # narrowed again after the call


def test_storage_is_compact_and_the_first_parameter_stays_float32():
    compact, fp32 = _unet_pair(torch.bfloat16)
    ratio = parameter_bytes(compact) / parameter_bytes(fp32)
    assert 0.5 <= ratio < 0.52, ratio
    assert next(compact.parameters()).dtype == torch.float32  # pipelines read a network's dtype from it
    for m in compact.modules():  # vectors (biases, norm scales) stay float32
        for p in m.parameters(recurse=False):
            assert p.dtype == (torch.bfloat16 if p.dim() >= 2 and p is not compact.conv_in.weight else torch.float32)
    assert is_compact(compact) and not is_compact(fp32) and precision_of(compact) == "compact"
    x, t, ctx = _unet_inputs()
    with torch.no_grad():
        expected = fp32(x, t, ctx)
        uncompact_(compact)
        assert not is_compact(compact) and {p.dtype for p in compact.parameters()} == {torch.float32}
        assert torch.equal(compact(x, t, ctx), expected)


def test_a_raising_call_and_concurrent_calls_leave_the_storage_compact():
    torch.manual_seed(0)
    layer = compact_(torch.nn.Linear(8, 8), keep_first=False)
    with pytest.raises(RuntimeError):
        layer(torch.randn(2, 5))  # wrong width: raises inside the layer
    assert layer.weight.dtype == torch.bfloat16
    x = torch.randn(64, 8)
    expected = torch.nn.functional.linear(x, layer.weight.float(), layer.bias)
    results, errors = [], []

    def run():
        try:
            for _ in range(200):
                results.append(torch.equal(layer(x), expected))
        except Exception as e:  # a thread that saw a half-swapped weight
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and all(results) and len(results) == 800
    assert layer.weight.dtype == torch.bfloat16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return sd.write_tiny(tmp_path_factory.mktemp("compact"))


def _generate(pipe):
    return pipe.generate("a red circle above a blue square", seed=3, steps=2, guidance=7.5)


def _rounded_pipe(folder, like):
    pipe = sd.load(folder)
    for net, ref in ((pipe.unet, like.unet), (pipe.vae, like.vae), (pipe.text_encoder.model, like.text_encoder.model)):
        _rounded(net, ref)
    return pipe


def test_whole_tiny_pipeline_is_bit_identical_and_half_the_bytes(tiny):
    compact = sd.load(tiny, compact=torch.bfloat16)
    fp32 = _rounded_pipe(tiny, compact)
    for net in (compact.unet, compact.vae, compact.text_encoder.model):
        assert is_compact(net)
    nets = ("unet", "vae")
    ratio = sum(parameter_bytes(getattr(compact, n)) for n in nets) / sum(parameter_bytes(getattr(fp32, n))
                                                                          for n in nets)
    assert 0.5 <= ratio < 0.53, ratio
    a, b = _generate(compact), _generate(fp32)
    assert torch.equal(a.latents, b.latents)
    assert a.images[0].tobytes() == b.images[0].tobytes()
    assert "precision: compact" in a.images[0].info["parameters"].lower()
    plain = _generate(sd.load(tiny))  # the unrounded weights give other latents: the rounding is there
    assert not torch.equal(plain.latents, a.latents)


def test_single_file_loads_compact_as_the_folder_does(tiny, tmp_path):
    file = sd.export(sd.load(tiny), tmp_path / "tiny.safetensors")
    from_file = sd.load(file, compact=torch.bfloat16)
    from_folder = sd.load(tiny, compact=torch.bfloat16)
    for net in ("unet", "vae"):
        a, b = getattr(from_file, net).state_dict(), getattr(from_folder, net).state_dict()
        assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_loading_reads_into_compact_storage_and_keeps_16_bit_files(tmp_path):
    path = tmp_path / "w.safetensors"
    w32, w16, b = torch.randn(6, 5), torch.randn(4, 3).half(), torch.randn(6)
    save_file({"w32": w32, "w16": w16, "b": b, "ids": torch.arange(3)}, path)
    state = load_state_dict(path, cast=compact_cast(torch.bfloat16))
    assert state["w32"].dtype == torch.bfloat16 and torch.equal(state["w32"], w32.bfloat16())
    assert state["w16"].dtype == torch.float16 and torch.equal(state["w16"], w16)  # not re-rounded to bf16
    assert state["b"].dtype == torch.float32 and torch.equal(state["b"], b)
    assert torch.equal(state["ids"], torch.arange(3))
    save_file({"w": torch.tensor([[1.0, float("nan")]])}, path)
    with pytest.raises(CheckpointError, match="NaN"):
        load_state_dict(path, cast=compact_cast(torch.bfloat16))


def test_a_bf16_load_reads_each_tensor_into_bf16_and_equals_a_cast_float32_load(tiny, tmp_path, monkeypatch):
    """A bf16 (or int8) load never holds the float32 model: the loaders read the files tensor by tensor
    with a cast (`t2i.compact.loading_cast`), and every part equals the float32 load cast to bf16."""
    import t2i.checkpoints.io as io

    reads = []
    plain = io._read_safetensors
    monkeypatch.setattr(io, "_read_safetensors", lambda path, *a: reads.append(path.parent.name) or plain(path, *a))
    file = sd.export(sd.load(tiny), tmp_path / "tiny.safetensors")
    for source, read in ((tiny, {"unet", "vae", "text_encoder"}), (file, {tmp_path.name})):
        reads.clear()
        bf16, fp32 = sd.load(source, torch.bfloat16), sd.load(source, torch.float32)
        assert set(reads) == read  # each file through the casting path, none memory-mapped whole
        for part in ("unet", "vae"):
            a, b = getattr(bf16, part).state_dict(), getattr(fp32, part).state_dict()
            assert all(a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k].bfloat16()) for k in a)
        a, b = bf16.text_encoder.model.state_dict(), fp32.text_encoder.model.state_dict()
        assert all(torch.equal(a[k], b[k].to(a[k].dtype)) and a[k].dtype in (torch.bfloat16, torch.int64) for k in a)


def test_a_16_bit_folder_keeps_its_dtype_in_every_part(tiny, tmp_path):
    """fp16 files (most released SD weights) are not re-rounded to bf16, text encoders included."""
    half = sd.export(sd.load(tiny, torch.float16), tmp_path / "half")
    pipe = sd.load(half, compact=torch.bfloat16)
    for net in (pipe.unet, pipe.vae, pipe.text_encoder.model):
        assert is_compact(net)
        assert {p.dtype for p in net.parameters() if p.dim() >= 2} - {torch.float32} == {torch.float16}
        assert {p.dtype for p in net.parameters() if p.dim() < 2} == {torch.float32}


def test_fp16_storage_keeps_a_tensor_past_its_range_in_bf16():
    big = torch.nn.Linear(2, 2)
    with torch.no_grad():
        big.weight.fill_(1e5)  # past fp16's 65504
    small = torch.nn.Sequential(torch.nn.Linear(2, 2), big)
    compact_(small, torch.float16, keep_first=False)
    assert small[0].weight.dtype == torch.float16 and big.weight.dtype == torch.bfloat16
    assert torch.isfinite(small(torch.ones(1, 2))).all()
    assert compact_cast(torch.float16)(torch.full((2, 2), 1e5)).dtype == torch.bfloat16


def test_compact_needs_float32_compute_and_a_16_bit_storage(tiny):
    with pytest.raises(ValueError, match="float32"):
        sd.load(tiny, torch.bfloat16, compact=torch.bfloat16)
    with pytest.raises(ValueError, match="storage"):
        compact_(torch.nn.Linear(2, 2), torch.float32)


def _kohya_lora(unet: UNet, path, seed: int = 0):
    """A rank-2 kohya LoRA on every attention query projection of `unet` (alpha 2: scale 1)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, m in unet.named_modules():
        if name.endswith("to_q"):
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(2, m.in_features, generator=g)
            state[f"{key}.lora_up.weight"] = torch.randn(m.out_features, 2, generator=g)
            state[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(state, path)
    return path


def test_lora_merges_into_compact_storage_and_unmerges_exactly(tiny, tmp_path):
    """A merged LoRA is rounded to the storage dtype (as in bf16), and unmerging restores the weights."""
    pipe = sd.load(tiny, compact=torch.bfloat16)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    lora = _kohya_lora(pipe.unet, tmp_path / "lora.safetensors")
    q = next(m for n, m in pipe.unet.named_modules() if n.endswith("to_q"))
    fp32 = _rounded_pipe(tiny, pipe)
    with apply_loras(pipe, [(lora, 1.0)]), apply_loras(fp32, [(lora, 1.0)]):
        fq = next(m for n, m in fp32.unet.named_modules() if n.endswith("to_q"))
        assert q.weight.dtype == torch.bfloat16 and is_compact(pipe.unet)
        assert torch.equal(q.weight, fq.weight.bfloat16())  # merged in float32, then rounded
        assert not torch.equal(q.weight, before[next(k for k in before if k.endswith("to_q.weight"))])
    after = pipe.unet.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_int8_on_a_compact_unet_quantizes_the_rounded_weights():
    """int8 layers replace compact ones (quantized from the rounded values); the other layers stay compact."""
    compact, fp32 = _unet_pair(torch.bfloat16)
    quantize_(compact, vnni=False)
    quantize_(fp32, vnni=False)
    assert int8_layers(compact) and is_compact(compact) and precision_of(compact) == "int8"
    assert compact.conv_out.weight.dtype == torch.bfloat16
    x, t, ctx = _unet_inputs()
    with torch.no_grad():
        assert torch.equal(compact(x, t, ctx), fp32(x, t, ctx))


def test_precision_compact_through_t2i_load_and_the_cli_and_refused_where_it_cannot_apply(tiny, tmp_path, capsys):
    """`t2i.load(..., precision="compact")` gives a compact SD pipeline whose image is float32's on the
    rounded weights; `t2i generate --precision compact` writes it; another family and --compile are refused
    by name."""
    import t2i
    from t2i.cli import main
    from t2i.systems.shapes_ldm import write_tiny_model

    pipe = t2i.load(tiny, precision="compact")
    assert is_compact(pipe.unet) and precision_of(pipe.unet) == "compact"
    assert torch.equal(_generate(pipe).latents, _generate(_rounded_pipe(tiny, pipe)).latents)
    out = tmp_path / "c.png"
    assert main(["generate", "a cat", "--model", str(tiny), "--precision", "compact", "--steps", "2", "--width", "32",
                 "--height", "32", "--seed", "0", "--quiet", "--out", str(out)]) == 0 and out.exists()
    with pytest.raises(ValueError, match="compact loads Stable Diffusion"):
        t2i.load(write_tiny_model(tmp_path / "ldm"), precision="compact")
    with pytest.raises(ValueError, match="cannot be compiled"):
        pipe.compile()
